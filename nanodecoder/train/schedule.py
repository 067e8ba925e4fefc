"""Learning-rate schedules, looked up by ``train.schedule.kind`` in the ``schedule`` registry.

A schedule is a pure function of the step: ``schedule(step)`` is the learning
rate of optimizer step ``step`` (0-based: the first update uses ``schedule(0)``).
Being stateless, a schedule resumes exactly from the step alone.  A registered
schedule is a class built as ``cls(params, total_steps, base_lr)`` (``base_lr`` is
``train.lr``, the peak) whose ``factor(step)`` scales ``base_lr``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps, nanoGPT style (never exactly zero)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Schedule:
    """Base class: subclasses define ``Params`` and ``factor``."""

    Params: ClassVar[type]
    PARAMS_SCHEMA: ClassVar[dict | None] = None  # built-ins: schema lives in train.schema.json

    def __init__(self, params: Mapping[str, Any], total_steps: int, base_lr: float):
        self.p = self.Params(**dict(params))
        self.total_steps = total_steps
        self.base_lr = base_lr

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.p}, total_steps={self.total_steps})"


class Constant(Schedule):
    @dataclass(frozen=True)
    class Params:
        warmup_steps: int = 0

    def factor(self, step: int) -> float:
        return warmup(step, self.p.warmup_steps)


class Cosine(Schedule):
    """Warm-up, half-cosine decay to the floor at ``decay_steps`` (default: all steps), then the floor."""

    @dataclass(frozen=True)
    class Params:
        warmup_steps: int = 100
        decay_steps: int | None = None
        min_lr: float | None = None
        min_lr_ratio: float = 0.1

    @property
    def floor(self) -> float:
        """The final factor: ``min_lr / lr`` when ``min_lr`` is set, else ``min_lr_ratio``."""
        return self.p.min_lr / self.base_lr if self.p.min_lr is not None else self.p.min_lr_ratio

    def factor(self, step: int) -> float:
        if step < self.p.warmup_steps:
            return warmup(step, self.p.warmup_steps)
        end = self.p.decay_steps or self.total_steps
        if step >= end:
            return self.floor
        progress = (step - self.p.warmup_steps) / max(1, end - self.p.warmup_steps)
        return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.floor)


class WSD(Schedule):
    """Warmup-stable-decay: warm-up, constant, then decay over the last ``decay_fraction`` of the steps."""

    @dataclass(frozen=True)
    class Params:
        warmup_steps: int = 100
        decay_fraction: float = 0.2
        decay_shape: str = "linear"
        min_lr_ratio: float = 0.0

    def factor(self, step: int) -> float:
        decay_steps = max(1, round(self.p.decay_fraction * self.total_steps))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return warmup(step, self.p.warmup_steps)
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        shape = {"linear": 1.0 - progress,
                 "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                 "sqrt": 1.0 - math.sqrt(progress)}[self.p.decay_shape]
        return self.p.min_lr_ratio + (1.0 - self.p.min_lr_ratio) * shape


def build_schedule(choice, total_steps: int, base_lr: float, registry=None) -> Schedule:
    """Build ``choice`` (a ``Choice``: kind + params) from the schedule registry."""
    if registry is None:
        from ..registry import registries
        registry = registries()["schedule"]
    return registry.get(choice.kind)(dict(choice.params), total_steps, base_lr)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
