"""A whole blueprint: its declared top level (:class:`RunSpec`), loading a file, and each part's spec.

    bp = load_blueprint("blueprints/moe_gpt.yaml", ["train.steps=100"])   # validated, all problems at once
    spec = run_spec(bp, vocab_size=prep.tokenizer.vocab_size)          # every section, typed and frozen

Downstream code receives only the part it needs (the model builder the
ModelSpec, the trainer the TrainSpec, ...) and never reads the YAML or the raw
mapping again.  The command line (``nanodecoder/cli/blueprint.py``) and the
Python API (:func:`nanodecoder.load`) are the two places that call this.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..config import Blueprint, build
from ..config import load_blueprint as _load
from ..config.declare import Kind, choice, declared, param
from ..data import DataSpec
from ..eval.spec import EvalSpec
from ..model.spec import ModelSpec
from ..runtime import RuntimeSpec
from ..train.spec import LoggingSpec, SampleSpec, TrainSpec
from .catalog import catalog


@declared
class RunSpec:
    """A YAML blueprint: the model, its data and its training run."""

    SCHEMA_TITLE = "Nanodecoder blueprint"

    extends: str = param("", doc="Another blueprint file (relative to this one) whose settings this one starts "
                                 "from; mappings are merged, other values replaced.")
    name: str = param("", doc="Run name (default: the file name without .yaml); runs go to runs/<name>/.",
                      pattern="^[A-Za-z0-9_.-]+$")
    description: str = param("", doc="Free text describing the blueprint.")
    model: ModelSpec = param(doc="The model architecture.")
    data: DataSpec | None = param(None, doc="Training data: source, tokenizer, sampling.")
    train: TrainSpec = param(factory=TrainSpec, doc="Optimisation and the training loop.")
    logging: LoggingSpec = param(factory=LoggingSpec, doc="Progress, run directory and Weights & Biases.")
    sample: SampleSpec = param(factory=SampleSpec, doc="Text sampled at the end of training.")
    runtime: RuntimeSpec = param(factory=RuntimeSpec, doc="Device, precision, compile and distributed profile.")
    finetune: Kind | None = choice("finetune", default=None,
                                   doc="Fine-tune a trained run (instruction tuning or a classification head) "
                                       "instead of pre-training on data.")
    eval: EvalSpec | None = param(None, doc="Benchmark evaluations during training (HellaSwag, bits per byte on a "
                                            "text file).")

    def check(self):
        if self.name and set(self.name) == {"."}:
            yield ("name",), (f"'{self.name}' is not a run name: the run would be written outside "
                              f"{self.logging.runs_dir}/; use letters, digits, '_', '-' or '.'")

    def with_vocab(self, tokenizer_vocab: int | None) -> "RunSpec":
        """This spec with the model's vocabulary resolved (see :meth:`ModelSpec.with_vocab`)."""
        return dataclasses.replace(self, model=self.model.with_vocab(tokenizer_vocab))


TOKENIZER_FILES = ("path", "files")     # data.tokenizer keys that name files or folders


def load_blueprint(path: str | Path, overrides: list[str] | None = None, *, validate: bool = True) -> Blueprint:
    """Load and validate a blueprint file (or a shipped blueprint's name) with every registered kind.

    Relative tokenizer files (``data.tokenizer.path``/``files``) are made absolute from the blueprint's
    folder here, as data sources are, so the tokenizer and its cache key do not depend on the current folder
    (and the run folder's copy of the blueprint names the files it used)."""
    bp = _load(path, overrides, root=RunSpec, catalog=catalog(), validate=validate)
    tok = (bp.raw.get("data") or {}).get("tokenizer") if isinstance(bp.raw.get("data"), dict) else None
    if isinstance(tok, dict):
        for key in TOKENIZER_FILES:
            value = tok.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                tok[key] = str((Path(bp.path).parent / os.path.expanduser(value)).resolve())
    return bp


def run_spec(bp: Blueprint | dict, vocab_size: int | None = None) -> RunSpec:
    """Every section of a validated blueprint as its typed spec.

    ``vocab_size``: the prepared tokenizer's, used where ``model.vocab_size`` is ``auto``.
    """
    raw = bp.raw if isinstance(bp, Blueprint) else bp
    return build(RunSpec, raw, catalog()).with_vocab(vocab_size)
