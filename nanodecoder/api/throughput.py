"""Training throughput of several trainers measured in one process, alternating, so machine noise hits all alike.

    trainers = [build_timing_trainer(spec_a, prep, 20), build_timing_trainer(spec_b, prep, 20)]
    seconds = alternate(trainers, rounds=5, steps=5, warmup=3)      # per trainer: seconds/step of each round
    per_step = [statistics.median(s) for s in seconds]

What ``tools/bench_pair.py`` prints as a ratio and what ``python -m nanodecoder.compare --match time`` turns into
step counts of equal time.  A trainer is anything with ``step()``; its runtime anything with ``synchronize()``
(so a test times fake steps on a fake clock).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from ..model import build_model
from ..runtime import setup_runtime
from ..train.trainer import Trainer, seed_everything
from .blueprint import RunSpec


def timed(trainer, runtime, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per optimizer step over ``steps`` steps of ``trainer`` (the device synchronised on both ends)."""
    runtime.synchronize()
    t0 = clock()
    for _ in range(steps):
        trainer.step()
    runtime.synchronize()
    return (clock() - t0) / steps


def alternate(trainers: Sequence[tuple[object, object]], *, rounds: int, steps: int, warmup: int = 0,
              clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """``(trainer, runtime)`` pairs: ``warmup`` untimed steps each (compilation, allocator, caches), then
    ``rounds`` rounds in which each trainer in turn runs ``steps`` timed steps.  Returns, per trainer, its
    seconds per step in each round."""
    for trainer, _ in trainers:
        for _ in range(warmup):
            trainer.step()
    times: list[list[float]] = [[] for _ in trainers]
    for _ in range(rounds):
        for (trainer, runtime), out in zip(trainers, times):
            out.append(timed(trainer, runtime, steps, clock))
    return times


def build_timing_trainer(spec: RunSpec, prep, steps: int | None = None, batches=None):
    """``(trainer, runtime)``: the real Trainer of a built run spec (vocabulary resolved) on its prepared data,
    with no run folder.  ``steps``: for timing that many steps or more, with the time budget off (the spec's
    steps raised to at least ``steps``, so its schedule stays valid); None keeps the spec's train section as it is.
    ``batches(runtime)``: another batch source (``tools/bench.py --synthetic``) instead of ``prep``'s data."""
    train = spec.train if steps is None else dataclasses.replace(spec.train, steps=max(spec.train.steps, steps),
                                                                 time_budget=None)
    runtime = setup_runtime(spec.runtime)
    seed_everything(train.seed)
    model = runtime.prepare_model(build_model(spec.model, device=runtime.build_device, seed=train.seed))
    trainer = Trainer(model, train, runtime, prep, context_length=spec.model.context_length,
                      sampling=spec.data.sampling, batches=batches(runtime) if batches is not None else None)
    return trainer, runtime
