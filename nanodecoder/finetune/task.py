"""What every fine-tuning kind shares: its data, its batches, its model and its Trainer.

A task (one registered class per ``finetune.kind``) is built from its spec, the
source run's tokenizer and the model's context length.  It stands where the
prepared token data stands in a pre-training run: ``run.py`` asks it for the
Trainer (``make_trainer``), which draws batches from the task's
:class:`~nanodecoder.data.units.UnitBatches` (the ``BatchSampler``
interface, so checkpoints and exact resume work unchanged) and evaluates with
the task's ``evaluation`` over its validation units.  A kind names its collate
and its evaluation from the layers below (``data/units.py``,
``train/evaluation.py``), so the Trainer never calls back up into this package
while it trains.
"""
from __future__ import annotations

from pathlib import Path
import functools
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..data import DataError
from ..data.builtin import builtin_file, is_builtin
from ..data.units import Collate, InOrder, UnitBatches
from ..model import build_model
from ..train.trainer import Trainer
from ..config.loader import blueprint_path


class FinetuneTask:
    kind: ClassVar[str]
    Spec: ClassVar[type]
    generates_text: ClassVar[bool] = True     # False: no LM head (no samples, no text evaluations)
    #: what a shipped file named ``data: builtin:NAME`` must hold for this kind (None: no shipped file fits)
    builtin_data: ClassVar[str | None] = None
    #: the units -> ``(x, y)`` batch function (``data/units.py``)
    collate: ClassVar[Collate]
    #: ``(trainer, validation batches) -> {"val_loss", "val_bpb" (None when not meaningful), ...}``
    evaluation: ClassVar[Callable[..., dict[str, Any]]]

    def __init__(self, spec, *, tokenizer, base_dir: Path, context_length: int, source=None):
        self.spec, self.tokenizer, self.context_length = spec, tokenizer, context_length
        self.base_dir, self.source = Path(base_dir), source
        self.train_units: list = []
        self.val_units: list = []
        self.notes: list[str] = []
        self.load()

    # ---- what a kind defines ------------------------------------------------------------
    def load(self) -> None:
        """Read and encode the data into ``train_units`` / ``val_units``."""
        raise NotImplementedError

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """The model to train, from the decoder holding the source weights."""
        return model

    def describe(self) -> str:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    def path(self, raw: str, key: str = "data") -> Path:
        """A data file named in the blueprint (relative paths start at the blueprint's folder; ``builtin:NAME`` is
        a file shipped with the package, see ``data/builtin.py``)."""
        if is_builtin(raw):
            return builtin_file(raw, self.builtin_data, f"finetune.{key}")
        path = blueprint_path(raw, self.base_dir)
        if not path.is_file():
            raise DataError(f"finetune.{key}: {path} does not exist (relative paths start at the blueprint's "
                            f"folder, {self.base_dir}); name another file with --set finetune.{key}=/path/to/file")
        return path

    @property
    def train_tokens(self) -> int:
        """Nominal tokens of one epoch (rows x context_length, as tokens/step counts them)."""
        return len(self.train_units) * self.context_length

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> UnitBatches:
        return UnitBatches(self.train_units, type(self).collate, batch_size, seed=seed, rank=rank,
                           world_size=world_size, kind=self.kind)

    def make_trainer(self, spec, runtime):
        """The Trainer of a fine-tuning run: source weights (fresh runs), this task's batches and evaluation."""
        model = build_model(spec.model, device=runtime.device, seed=spec.train.seed)
        if self.source is not None:            # None when resuming: the run's own checkpoint is loaded next
            self.source.load_weights(model)
        model = runtime.prepare_model(self.adapt_model(model))
        local = runtime.local_batch(spec.train.batch_size)       # train.batch_size is the global batch
        batches = self.batches(local, spec.train.seed, runtime.rank, runtime.world_size)
        return Trainer(model, spec.train, runtime, self, context_length=spec.model.context_length,
                       batches=batches, evaluator=self.evaluator(spec.train.batch_size))

    def evaluator(self, batch_size: int):
        """``evaluator(trainer)``: this kind's evaluation over every validation unit, ``batch_size`` a batch."""
        return functools.partial(type(self).evaluation, batches=self.val_batches(batch_size))

    def val_batches(self, batch_size: int) -> InOrder:
        return InOrder(self.val_units, type(self).collate, batch_size)

    def source_line(self) -> str:
        return f"from {self.source.checkpoint}" if self.source is not None else "resumed (weights from this run)"
