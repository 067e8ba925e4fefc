"""Learning-rate schedules, looked up by ``train.schedule.kind`` in the ``schedule`` registry.

A schedule is a pure function of the step: ``schedule(step)`` is the learning
rate of optimizer step ``step`` (0-based: the first update uses ``schedule(0)``).
Being stateless, a schedule resumes exactly from the step alone.  A registered
schedule is a class with a declared ``Spec``, built as ``cls(spec, total_steps,
base_lr)`` (``base_lr`` is ``train.lr``, the peak), whose ``factor(step)``
scales ``base_lr``.

``free_steps()`` says how many leading steps have a learning rate that does not
depend on ``total_steps`` (``None``: all of them).  A time budget uses it to
settle the run's length as late as it can without changing any learning rate
already applied (``loop.TimeBudget``).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from ..config.declare import Kind, declared, param

WARMUP_DOC = "Steps of linear warm-up from lr/warmup_steps to lr."


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps, nanoGPT style (never exactly zero)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Schedule:
    """Base class: subclasses declare ``Spec`` and define ``factor``."""

    Spec: ClassVar[type[Kind]]

    def __init__(self, spec, total_steps: int, base_lr: float):
        self.p = spec
        self.total_steps = total_steps
        self.base_lr = base_lr

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def free_steps(self) -> int | None:
        """Leading steps whose learning rate is the same for every ``total_steps`` (None: every step).
        The default, 0, claims none (a time budget then never re-plans); a schedule that knows says so."""
        return 0

    def __call__(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.p}, total_steps={self.total_steps})"


class Constant(Schedule):
    """Linear warm-up, then the peak learning rate until the end."""

    @declared
    class Spec(Kind):
        warmup_steps: int = param(0, doc=WARMUP_DOC, minimum=0)

    def factor(self, step: int) -> float:
        return warmup(step, self.p.warmup_steps)

    def free_steps(self) -> int | None:
        return None


class Cosine(Schedule):
    """Linear warm-up, then a half cosine from lr down to the floor at decay_steps, then the floor."""

    @declared
    class Spec(Kind):
        warmup_steps: int = param(100, doc=WARMUP_DOC, minimum=0)
        decay_steps: int | None = param(None, doc="Step at which the cosine reaches the floor; null means "
                                                  "train.steps.", minimum=1)
        min_lr: float | None = param(None, doc="Absolute floor of the learning rate; overrides min_lr_ratio when "
                                               "set.", minimum=0)
        min_lr_ratio: float = param(0.1, doc="Floor of the learning rate as a fraction of train.lr.",
                                    minimum=0, maximum=1)

    @property
    def floor(self) -> float:
        """The final factor: ``min_lr / lr`` when ``min_lr`` is set, else ``min_lr_ratio``."""
        return self.p.min_lr / self.base_lr if self.p.min_lr is not None else self.p.min_lr_ratio

    def free_steps(self) -> int | None:
        return None if self.p.decay_steps is not None else self.p.warmup_steps + 1    # the peak, at progress 0

    def factor(self, step: int) -> float:
        if step < self.p.warmup_steps:
            return warmup(step, self.p.warmup_steps)
        end = self.p.decay_steps or self.total_steps
        if step >= end:
            return self.floor
        progress = (step - self.p.warmup_steps) / max(1, end - self.p.warmup_steps)
        return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.floor)


class WSD(Schedule):
    """Warmup-stable-decay: linear warm-up, constant lr, then a decay to the floor over the last decay_fraction
    of the steps."""

    @declared
    class Spec(Kind):
        warmup_steps: int = param(100, doc=WARMUP_DOC, minimum=0)
        decay_fraction: float = param(0.2, doc="Fraction of train.steps, at the end, spent decaying.",
                                      exclusive_minimum=0, maximum=1)
        decay_shape: Literal["linear", "cosine", "sqrt"] = param(
            "linear", doc="Shape of the decay: linear, half cosine, or 1 - sqrt (as in MiniCPM).")
        min_lr_ratio: float = param(0.0, doc="Floor of the learning rate at the last step as a fraction of "
                                             "train.lr.", minimum=0, maximum=1)

    @property
    def decay_start(self) -> int:
        return self.total_steps - max(1, round(self.p.decay_fraction * self.total_steps))

    def free_steps(self) -> int | None:
        return self.decay_start         # warm-up and the stable phase

    def factor(self, step: int) -> float:
        decay_start = self.decay_start
        decay_steps = self.total_steps - decay_start
        if step < decay_start:
            return warmup(step, self.p.warmup_steps)
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        shape = {"linear": 1.0 - progress,
                 "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                 "sqrt": 1.0 - math.sqrt(progress)}[self.p.decay_shape]
        return self.p.min_lr_ratio + (1.0 - self.p.min_lr_ratio) * shape


def build_schedule(spec, total_steps: int, base_lr: float) -> Schedule:
    """The schedule ``spec`` (the built ``train.schedule`` block) describes."""
    return spec.build(total_steps, base_lr)


def set_lr(optimizer, lr: float) -> None:
    """Set every group's learning rate: ``lr`` times the group's ``lr_scale`` (its peak / train.lr; 1 if absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
