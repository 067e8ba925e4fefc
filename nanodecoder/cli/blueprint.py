"""The command line's blueprint helpers: the vocabulary of a blueprint's tokenizer and a blueprint's
ModelSpec (``tools/param_count.py``, the plan); the RunSpec itself, ``load_blueprint`` and ``run_spec`` are the
library's (``nanodecoder/api/blueprint.py``), imported here for the command-line modules and existing imports.
"""
from __future__ import annotations

from pathlib import Path

from ..api.blueprint import TOKENIZER_FILES, RunSpec, load_blueprint, run_spec
from ..api.catalog import catalog
from ..config import Blueprint, BlueprintError, build
from ..data import prepare_data, tokenizer_vocab_size
from ..model.spec import ModelSpec

__all__ = ["TOKENIZER_FILES", "RunSpec", "blueprint_model_spec", "blueprint_vocab", "load_blueprint", "run_spec"]


def blueprint_vocab(bp: Blueprint, spec: RunSpec | None = None, prepare: bool = True) -> int | None:
    """The vocabulary size of the blueprint's tokenizer (None without a data section).

    Known without the corpus for byte, bpe and tiktoken; a char vocabulary
    needs the corpus, which is prepared (and cached) when ``prepare`` is true.
    """
    spec = spec or build(RunSpec, bp.raw, catalog())
    if spec.data is None:
        return None
    vocab = tokenizer_vocab_size(spec.data)
    if vocab is None and prepare:
        vocab = prepare_data(spec.data, base_dir=bp.path.parent).tokenizer.vocab_size
    return vocab


def blueprint_model_spec(path: str | Path, overrides: list[str] | None = None,
                         vocab_size: int | None = None) -> tuple[Blueprint, ModelSpec]:
    """Load a blueprint and build its ModelSpec (the vocabulary from the tokenizer where it is 'auto')."""
    bp = load_blueprint(path, overrides)
    spec = build(RunSpec, bp.raw, catalog())
    if vocab_size is None and spec.model.vocab_size == "auto":
        vocab_size = blueprint_vocab(bp, spec)
        if vocab_size is None:
            raise BlueprintError([bp.problem(("model", "vocab_size"), "vocab_size is 'auto' but the blueprint has "
                                             "no data section to take the tokenizer from; set model.vocab_size or "
                                             "add a data section")])
    return bp, spec.model.with_vocab(vocab_size)
