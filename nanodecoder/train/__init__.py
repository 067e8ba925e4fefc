"""The training run: optimizer, schedule, loop, checkpoints, metrics and plots.

``register(regs)`` adds the built-in optimizer and schedule kinds to the
registries (called from ``nanodecoder/builtins.py``).  Heavier pieces
(``trainer``, ``wandb_log``, ``plots``) are imported where they are used, so
importing this package stays cheap.
"""
from __future__ import annotations

from .optim import AdamW, build_optimizer
from .schedule import WSD, Constant, Cosine, build_schedule
from .spec import Choice, LoggingSpec, SampleSpec, TrainSpec, WandbSpec


def register(regs) -> None:
    """Add ``optimizer: adamw`` and ``schedule: constant | cosine | wsd``."""
    regs["optimizer"].add("adamw", AdamW)
    regs["schedule"].add("constant", Constant)
    regs["schedule"].add("cosine", Cosine)
    regs["schedule"].add("wsd", WSD)


__all__ = ["AdamW", "Choice", "Constant", "Cosine", "LoggingSpec", "SampleSpec", "TrainSpec", "WSD",
           "WandbSpec", "build_optimizer", "build_schedule", "register"]
