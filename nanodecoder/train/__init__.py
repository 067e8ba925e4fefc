"""The training run: optimizer, schedule, loop, checkpoints, metrics and plots.

``register(catalog)`` adds the built-in optimizer and schedule kinds, one line
each (the command-line layer's catalog calls it).
"""
from __future__ import annotations

from .optim import AdamW, Muon, build_optimizer
from .schedule import WSD, Constant, Cosine, build_schedule
from .spec import LoggingSpec, SampleSpec, TrainSpec, WandbSpec


def register(catalog) -> None:
    """Add ``optimizer: adamw | muon`` and ``schedule: constant | cosine | wsd``."""
    catalog["optimizer"].add("adamw", AdamW)
    catalog["optimizer"].add("muon", Muon)
    catalog["schedule"].add("constant", Constant)
    catalog["schedule"].add("cosine", Cosine)
    catalog["schedule"].add("wsd", WSD)


__all__ = ["AdamW", "Constant", "Cosine", "LoggingSpec", "Muon", "SampleSpec", "TrainSpec", "WSD",
           "WandbSpec", "build_optimizer", "build_schedule", "register"]
