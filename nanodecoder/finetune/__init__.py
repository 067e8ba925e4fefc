"""Fine-tuning a trained run: instruction tuning (SFT) and classification heads.

A blueprint with a ``finetune:`` section is an ordinary run (``python -m
nanodecoder.run``: checkpoints, exact resume, metrics, plots, W&B) that starts
from the weights and tokenizer of the run named by ``finetune.from``::

    finetune:
      kind: instruction            # or classification (n_classes, train_last_blocks, ...)
      from: ../runs/dense_gpt      # a run directory, or a folder of runs (the newest)
      data: instruction_data.json  # Alpaca records: instruction, input, output

``register(regs)`` adds the ``finetune`` kinds (called from ``builtins.py``).
Answer an instruction with a tuned run: ``python -m nanodecoder.finetune.answer RUN_DIR "..."``.
"""
from __future__ import annotations

from .spec import ClassificationSpec, FinetuneSpec, InstructionSpec, TemplateSpec


def register(regs) -> None:
    """Add ``finetune: instruction | classification``."""
    from .classification import ClassificationTuning
    from .instruction import InstructionTuning
    regs["finetune"].add("instruction", InstructionTuning)
    regs["finetune"].add("classification", ClassificationTuning)


def prepare_finetune(bp, base_dir, resume=None):
    from .setup import prepare_finetune as prepare
    return prepare(bp, base_dir, resume)


def dry_run(bp, task, spec) -> int:
    from .setup import dry_run as run
    return run(bp, task, spec)


__all__ = ["ClassificationSpec", "FinetuneSpec", "InstructionSpec", "TemplateSpec", "dry_run", "prepare_finetune",
           "register"]
