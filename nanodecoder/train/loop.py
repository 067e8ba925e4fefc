"""A training run: drive a :class:`Trainer` and keep its run directory up to date.

:class:`TrainingLoop` takes the optimizer steps and hands each one to its hooks (``hooks.py``: metrics rows,
evaluation and plots, periodic evaluations, checkpoints and the best one, the time budget, the final sample); it
stops cleanly on Ctrl-C / SIGTERM (the checkpoint hook saves the step), stops on a non-finite loss naming the
step, and prints the start and end summaries.  Resuming (:func:`resume_trainer`) and the architecture checks of
a resume are here too.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..config.diff import ABSENT, differences
from ..config.loader import dotted
from ..runtime.distributed import lost_peer
from .optim import param_names
from .checkpoint import (CheckpointError, PendingSave, check_architecture, disk_full_error, is_sharded,
                         load_model_weights, load_state, read_manifest, read_shards, shard_metadata, shard_shapes,
                         verify_checkpoint)
from .metrics import MetricsLog, MoEMonitor
from .rundir import RunDir
from .schedule import build_schedule
from .summary import end_summary
from .trainer import NonFiniteLoss, StepOutput, Trainer
from .wandb_log import finish_wandb

EXIT_OK, EXIT_NONFINITE, EXIT_RANK_LOST = 0, 3, 5


class RankLost(Exception):
    """Another process of the job died or stopped answering during a collective: the job ends (the message, one
    line, is already printed on stderr); ``--resume`` continues from the last complete checkpoint."""


@dataclass
class RunResult:
    status: str                 # "completed" | "interrupted" | "non-finite"
    step: int
    best_val_loss: float
    best_step: int | None
    last_eval: dict | None
    run_dir: Path
    wall_s: float
    exit_code: int


class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a stop request (checked between steps); a second SIGINT aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


ALLOW_ARCHITECTURE_CHANGE = "--allow-architecture-change"


class ArchitectureChanged(CheckpointError):
    """Resuming with a ``model:`` section other than the one the run was trained with."""


def architecture_changes(saved: dict, now: dict, prefix: str = "model") -> list[str]:
    """``key: old in the checkpoint, new now`` for each leaf that differs between two ``model:`` sections
    written out in full (every default filled in, e.g. by ``to_yaml(spec.model)``), so that writing a default
    explicitly is no change."""
    return [f"{dotted((prefix, *d.path))}: {_shown(d.old)} in the checkpoint, {_shown(d.new)} now"
            for d in differences(saved, now)]


def _shown(value) -> str:
    return "absent" if value is ABSENT else json.dumps(value)


def refuse_architecture_change(changes: list[str], run: RunDir, allow: bool = False) -> None:
    """Raise ArchitectureChanged listing ``changes`` unless ``allow`` (the command line's
    ``--allow-architecture-change``)."""
    if changes and not allow:
        raise ArchitectureChanged("\n".join(
            [f"cannot resume {run}: the model section differs from the one its checkpoints were trained with:",
             *(f"  {c}" for c in changes),
             f"  resume with the run's own model section, or pass {ALLOW_ARCHITECTURE_CHANGE} to load the "
             "checkpoint into the changed model (every tensor must keep its name and shape)"]))


def resume_trainer(trainer: Trainer, run: RunDir, which: str = "latest") -> Path:
    """Load one of the run's checkpoints (``latest``, ``best`` or a folder name such as ``step_000040``) into
    the trainer's model and state.  Checkpoints after it are moved to ``ckpt/superseded/`` (rank 0), since
    the run continues from this one."""
    path = run.checkpoints.resolve(which)
    if is_sharded(read_manifest(path)):       # every rank reads its own part, whatever layout wrote it
        verify_checkpoint(path)
        state = load_state(path)
        trainer.runtime.reshard(trainer.raw_model)
        check_architecture(path, shard_shapes(path), {}, trainer.raw_model,
                           trainer.runtime.full_state_shapes(trainer.raw_model))
        names = trainer.check_optimizer_params(state)
        trainer.runtime.load_sharded_state(trainer.raw_model, trainer.optimizer, names, shard_metadata(path),
                                           lambda t: read_shards(path, t), state["optimizer"]["param_groups"])
        trainer.load_state_dict(state)
    else:
        load_model_weights(trainer.raw_model, path, shapes=trainer.runtime.full_state_shapes(trainer.raw_model),
                           load=lambda full: trainer.runtime.load_model_state(trainer.raw_model, full))
        trainer.load_state_dict(load_state(path))
    if trainer.runtime.is_main:
        moved = run.checkpoints.set_aside_after(path)
        if moved:
            print(f"note: resuming from {path.name}; the later checkpoints {', '.join(moved)} were moved to "
                  f"{run.checkpoints.root / 'superseded'}", file=sys.stderr)
    return path


class _NoMetrics:
    """Ranks other than 0 write no metrics (they still compute every number)."""
    rows: list = []

    def write(self, row: dict) -> dict:
        return row

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, silent: bool = False):
        self.bar = None
        self.silent = silent        # ranks other than 0 print nothing
        if enabled:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def echo(self, text: str) -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


clock = time.perf_counter     # the loop's clock (tests replace it with a fake one)


class TimeBudget:
    """``train.time_budget``: fix the run's step count from the speed of its steps; say when the clock has run
    out.  Training time is the time of optimizer steps only (``trainer.train_time_s``).

    The count is first fixed after ``budget_probe_steps``.  While the steps taken are still ones whose learning
    rate does not depend on the count (``Schedule.free_steps``: WSD's warm-up and stable phase, cosine's
    warm-up), it is re-planned every ``budget_probe_steps`` steps from the speed of the later half of the steps
    since the first count, never so that an applied learning rate would change; it is final once the schedule
    starts to depend on it (WSD's decay begins).  A machine whose speed drifts therefore still ends the decay inside
    the budget.  The count in force is stored in checkpoints (a resume is exact from there on)."""

    def __init__(self, trainer: Trainer, spec):
        self.trainer, self.seconds, self.probe = trainer, spec.time_budget_s, spec.budget_probe_steps
        self.times: list[float] = []    # this session's step times
        self.since_fix = 0              # how many of them came after the first count
        self.per_step = 0.0
        self.first_count: int | None = None

    def after_step(self, seconds: float) -> str | None:
        """Record one step's time; ``"fixed"`` on the step that fixes the count, ``"final"`` on the step that
        re-plans it for the last time, else None (re-plans in between change ``total_steps`` quietly)."""
        t = self.trainer
        self.times.append(seconds)
        if not t.budget_fixed:
            if len(self.times) < self.probe:
                return None
            self._count(self.times[1:] or self.times)           # the first step may compile
            self.first_count = t.total_steps
            return "fixed"
        self.since_fix += 1
        if t.budget_replanned:
            return None
        free = t.schedule.free_steps()
        if free is None or free < t.step_count:    # nothing is left to re-plan (or never was)
            t.budget_replanned = True
            return None
        if free != t.step_count and self.since_fix % self.probe:
            return None
        # the later half of this session's steps since the first count (after a resume: of all but the first):
        # long enough to average out noise, recent enough to follow a drift
        since = self.times[-self.since_fix:] if self.since_fix < len(self.times) else self.times[1:]
        window = since[-max(self.probe, len(since) // 2):]
        if len(window) >= self.probe:
            self._count(window, keep=t.step_count)
        if t.schedule.free_steps() == t.step_count:     # the next step's learning rate depends on the count
            t.budget_replanned = True
            return "final"
        return None

    def _count(self, timed: list[float], keep: int = 0) -> None:
        """Fix the count from the mean of ``timed``, keeping the learning rates of the first ``keep`` steps."""
        t = self.trainer
        self.per_step = max(sum(timed) / len(timed), 1e-9)
        left = max(0.0, self.seconds - t.train_time_s)
        total = _free_at_least(t, t.step_count + int(left // self.per_step), keep)
        t.fix_total_steps(int(t.runtime.broadcast_text(str(total))))     # rank 0's count on every rank

    def out_of_time(self) -> bool:
        return self.trainer.train_time_s >= self.seconds


def budget_line(budget_text: str, event: str, step: int, total: int, budget: TimeBudget) -> str:
    ms = f"{1000 * budget.per_step:.1f} ms/step"
    if event == "fixed":
        return f"time budget {budget_text}: {ms} measured over the first {step} steps -> {total:,} steps in all"
    first = f" (first count {budget.first_count:,})" if budget.first_count is not None else ""
    return (f"time budget {budget_text}: {ms} lately; the schedule depends on the count from "
            f"step {step + 1}: {total:,} steps in all{first}")


def _free_at_least(trainer: Trainer, total: int, steps: int) -> int:
    """The smallest count >= ``total`` whose schedule gives the first ``steps`` steps the learning rates they
    had (the count in force does, by the caller's check)."""
    if steps == 0:
        return total
    for candidate in range(max(total, steps), max(total, steps, trainer.total_steps) + 1):
        free = build_schedule(trainer.spec.schedule, candidate, trainer.spec.lr).free_steps()
        if free is None or free >= steps:
            return candidate
    return trainer.total_steps


@dataclass
class Step:
    """One finished optimizer step as the hooks see it; the hooks fill in what it asks of the rest of the step."""
    number: int                     # optimizer steps taken (1-based)
    total: int                      # the run's length now (a time budget may change it)
    result: StepOutput
    seconds: float                  # the step's own time
    out_of_time: bool = False       # the time budget is spent: log, evaluate and checkpoint as at the last step
    stop: Stop | None = None        # the run ends after this step (a checkpoint is saved first)
    best: bool = False              # this step's evaluation is the best so far
    paused: bool = False            # a hook spent time that is not training throughput (eval, checkpoint)


@dataclass(frozen=True)
class Stop:
    status: str                     # "interrupted" | "out of time"
    code: int                       # the process's exit code
    message: str                    # printed when the run stops


class Hook:
    """Something the loop does around the optimizer steps (``hooks.py``: logging, evaluation, periodic evals,
    checkpoints, the time budget, the final sample).  Hooks run in their list's order."""

    def start(self, loop: TrainingLoop) -> None:
        """Before the first step (the metrics log is open, the start summary printed)."""

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        """After each optimizer step."""

    def end(self, loop: TrainingLoop) -> None:
        """After the last step, before the end summary (``loop.status`` is known)."""


class TrainingLoop:
    """Drive a :class:`Trainer` for a run folder: optimizer steps until the run's length, each followed by the
    hooks; Ctrl-C / SIGTERM (a stop request, saved by the checkpoint hook) and a non-finite loss end it early.
    Only rank 0 writes metrics, plots, checkpoints and samples, and prints."""

    def __init__(self, trainer: Trainer, run: RunDir, hooks: Sequence[Hook], *, logging, wandb_run=None,
                 out: Callable[[str], None] = print, planned_memory: float | None = None):
        self.trainer, self.run, self.hooks, self.wandb_run = trainer, run, list(hooks), wandb_run
        self.planned_memory = planned_memory     # bytes per process, the memory plan's total (None: not planned)
        self.main = trainer.runtime.is_main
        self.out = out if self.main else _quiet
        self.logging = logging
        self.metrics = MetricsLog(run / RunDir.METRICS, wandb_run) if self.main else _NoMetrics()
        self.progress: _Progress | None = None
        self.moe: MoEMonitor | None = None
        self.status, self.code = "completed", EXIT_OK
        self.last_eval: dict | None = None
        self.elapsed0 = trainer.elapsed_s
        self.t_start = self.t_log = time.perf_counter()
        self.steps_since_log = 0
        self.pending_save: PendingSave | None = None      # train.async_checkpoint: the one being written

    def elapsed(self) -> float:
        """Wall time of the whole run, earlier sessions included."""
        return self.elapsed0 + time.perf_counter() - self.t_start

    def restart_throughput_clock(self) -> None:
        self.t_log, self.steps_since_log = time.perf_counter(), 0

    def save(self, best: bool = False) -> Path | None:
        """A checkpoint of the current step (every rank takes part: FSDP gathers the shards).  With
        ``train.async_checkpoint`` a sharded one is written in the background and sealed by :meth:`finish_save`
        (at the next save or the end of the run); None until then.  A full disk is a CheckpointError that says
        so (the partial write removed, the previous checkpoint intact)."""
        self.finish_save()
        with self._disk_full_explained(self.trainer.step_count):
            return self._save(best)

    @contextlib.contextmanager
    def _disk_full_explained(self, step: int):
        try:
            yield
        except Exception as e:
            clear = disk_full_error(self.run.checkpoints.root, self.run.checkpoints.name(step), e,
                                    f"python -m nanodecoder.run --resume {self.run}")
            if clear is None:
                raise
            raise clear from None

    def _save(self, best: bool) -> Path | None:
        trainer = self.trainer
        trainer.elapsed_s = self.elapsed()
        runtime, fmt = trainer.runtime, trainer.spec.checkpoint_format
        if fmt == "sharded" or (fmt == "auto" and runtime.shards_by_default):
            runtime.reshard(trainer.raw_model)
            names = param_names(trainer.raw_model, trainer.optimizer)
            tensors, groups = runtime.sharded_state(trainer.raw_model, trainer.optimizer, names)
            background = runtime.write_shards_in_background if trainer.spec.async_checkpoint else None
            saved = self.run.checkpoints.save_sharded(trainer.step_count, trainer.state_dict(optimizer_groups=groups),
                                                      tensors, main=self.main, agree=runtime.broadcast_text, best=best,
                                                      background=background)
            if isinstance(saved, PendingSave):
                self.pending_save = saved
                return None
            return saved
        model_state = runtime.model_state(trainer.raw_model)
        state = trainer.state_dict()
        if not self.main:
            return None
        return self.run.checkpoints.save(trainer.step_count, trainer.raw_model, state, best=best,
                                         model_state=model_state)

    def finish_save(self) -> Path | None:
        """Seal the checkpoint being written in the background, once it is written (no-op when none is)."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return None
        with self._disk_full_explained(pending.step):
            return pending.finish()

    def memory_row(self) -> dict:
        """Each rank's peak memory (``runtime.memory_label``) and what it added since before the model was built,
        beside the plan's total per process (collective; ``run.json``'s ``memory``)."""
        runtime = self.trainer.runtime
        per_rank = runtime.memory_per_rank()
        mib = 2 ** 20
        return {"step": self.trainer.step_count, "measure": runtime.memory_label,
                "peak_mib": [round(peak / mib, 1) for _, peak in per_rank],
                "model_mib": [round((peak - before) / mib, 1) for before, peak in per_rank],
                "planned_mib": round(self.planned_memory / mib, 1) if self.planned_memory is not None else None}

    def start(self, summary: str) -> None:
        trainer = self.trainer
        self.metrics.truncate_after(trainer.step_count)
        self.out(summary)
        self.progress = _Progress(self.logging.progress and self.main, trainer.total_steps, trainer.step_count,
                                  silent=not self.main)
        self.moe = MoEMonitor(self.logging.empty_expert_warn_after, warn=self.progress.echo)
        self.t_start = time.perf_counter()
        self.elapsed0 = trainer.elapsed_s
        for hook in self.hooks:
            hook.start(self)

    def run_steps(self) -> None:
        trainer, runtime = self.trainer, self.trainer.runtime
        try:
            with GracefulStop() as signals:
                self.restart_throughput_clock()
                while trainer.step_count < trainer.total_steps:
                    t_step = clock()
                    result = trainer.step()
                    dt = clock() - t_step
                    trainer.train_time_s += dt
                    step = Step(trainer.step_count, trainer.total_steps, result, dt)
                    if runtime.any_rank(signals.signum is not None):    # all ranks stop at the same step
                        signum = signals.signum or signal.SIGTERM          # another rank's signal
                        step.stop = Stop("interrupted", 128 + signum,
                                         f"{signal.Signals(signum).name} received: checkpoint saved at step "
                                         f"{step.number}; continue with: python -m nanodecoder.run --resume "
                                         f"{self.run}")
                    for hook in self.hooks:
                        hook.after_step(self, step)
                    if step.stop is not None:
                        self.status, self.code = step.stop.status, step.stop.code
                        self.progress.echo(step.stop.message)
                        break
                    if step.paused:   # eval/checkpoint time is not training throughput
                        self.restart_throughput_clock()
        except NonFiniteLoss as e:
            self.status, self.code = "non-finite", EXIT_NONFINITE
            self.progress.echo(f"error: {e}")
        except RuntimeError as e:     # printed here, while the signal handlers still hold torchrun's SIGTERM
            lost = lost_peer(e, runtime.rank, runtime.world_size) if runtime.is_distributed else None
            if lost is None:
                raise
            latest = self.run.checkpoints.latest()
            since = latest.name if latest else "the start"
            print(f"error: {lost} during a collective after step {trainer.step_count} (seen by rank "
                  f"{runtime.rank}); the job ends; continue from {since} with: python -m nanodecoder.run "
                  f"--resume {self.run}", file=sys.stderr, flush=True)
            raise RankLost(lost) from None
        finally:
            self.progress.close()
            self.metrics.close()

    def finish(self) -> RunResult:
        trainer, run = self.trainer, self.run
        self.finish_save()
        wall = self.elapsed()
        for hook in self.hooks:
            hook.end(self)
        files = [f for f in (RunDir.METRICS, RunDir.LOSS_PLOT, RunDir.LOAD_PLOT, RunDir.SAMPLES, "ckpt/")
                 if (run / f.rstrip("/")).exists()]
        memory = self.memory_row() if self.status != "non-finite" else None   # every rank got here together
        self.out(end_summary(status=self.status, trainer=trainer, run_dir=run, wall_s=wall,
                             last_eval=self.last_eval, files=files, memory=memory))
        if self.main:
            run.update_meta(status=self.status, step=trainer.step_count,
                            best_val_loss=_finite(trainer.best_val_loss), best_step=trainer.best_step, wall_s=wall,
                            **({"memory": memory} if memory is not None else {}))
        if self.wandb_run is not None:
            finish_wandb(self.wandb_run, {"best_val_loss": _finite(trainer.best_val_loss), "status": self.status},
                         self.code)
        return RunResult(self.status, trainer.step_count, trainer.best_val_loss, trainer.best_step, self.last_eval,
                         run.path, wall, self.code)

    def __call__(self, summary: str) -> RunResult:
        """The whole session: ``summary`` (the start summary) printed, the steps, the end."""
        self.start(summary)
        self.run_steps()
        return self.finish()


def _quiet(text: str) -> None:
    pass


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
