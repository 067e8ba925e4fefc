"""Fine-tuning a trained run: instruction tuning (SFT) and classification heads.

A blueprint with a ``finetune:`` section is an ordinary run (``python -m
nanodecoder.run``: checkpoints, exact resume, metrics, plots, W&B) that starts
from the weights and tokenizer of the run named by ``finetune.from``::

    finetune:
      kind: instruction            # or classification (n_classes, train_last_blocks, ...)
      from: ../runs/dense_gpt      # a run directory, or a folder of runs (the newest)
      data: instruction_data.json  # Alpaca records: instruction, input, output

``register(catalog)`` adds the ``finetune`` kinds, one line each.
Answer an instruction with a tuned run: ``python -m nanodecoder.finetune.answer RUN_DIR "..."``.
"""
from __future__ import annotations

from .classification import ClassificationTuning
from .instruction import InstructionTuning
from .setup import dry_run, prepare_finetune
from .spec import ClassificationSpec, InstructionSpec, TemplateSpec


def register(catalog) -> None:
    """Add ``finetune: instruction | classification``."""
    catalog["finetune"].add("instruction", InstructionTuning)
    catalog["finetune"].add("classification", ClassificationTuning)


__all__ = ["ClassificationSpec", "ClassificationTuning", "InstructionSpec", "InstructionTuning", "TemplateSpec",
           "dry_run", "prepare_finetune", "register"]
