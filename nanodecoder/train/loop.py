"""A training run: drive a :class:`Trainer` and keep its run directory up to date.

``run_training`` logs metrics rows, evaluates, plots, saves checkpoints (and the
best one), stops cleanly on Ctrl-C / SIGTERM after saving a checkpoint, stops
on a non-finite loss naming the step, writes the final sample, and prints the
start and end summaries.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..config.diff import ABSENT, differences
from ..config.loader import dotted
from ..model.generate import sample_text
from .checkpoint import CheckpointError, load_model_weights, load_state
from .metrics import MetricsLog, MoEMonitor
from .plots import plot_expert_load, plot_losses
from .rundir import RunDir
from .schedule import build_schedule
from .summary import end_summary, start_summary
from .trainer import NonFiniteLoss, Trainer
from .wandb_log import finish_wandb

EXIT_OK, EXIT_NONFINITE = 0, 3


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
    load_model_weights(trainer.raw_model, path,
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


def run_training(trainer: Trainer, run: RunDir, *, logging, sample, name: str, params, tokenizer,
                 wandb_run=None, resumed_from: Path | None = None, train_tokens: int = 0,
                 out: Callable[[str], None] = print, evals: tuple = ()) -> RunResult:
    """``evals``: periodic evaluations (``nanodecoder.eval.PeriodicEval``) logged as their own eval rows."""
    spec = trainer.spec
    runtime = trainer.runtime
    main = runtime.is_main          # only rank 0 writes metrics, plots, checkpoints, samples and prints
    if not main:
        out = _quiet
    metrics = MetricsLog(run / RunDir.METRICS, wandb_run) if main else _NoMetrics()
    metrics.truncate_after(trainer.step_count)
    out(start_summary(name=name, run_dir=run, params=params, trainer=trainer, runtime=trainer.runtime,
                      train_tokens=train_tokens, resumed_from=str(resumed_from) if resumed_from else None))
    progress = _Progress(logging.progress and main, trainer.total_steps, trainer.step_count, silent=not main)
    budget = TimeBudget(trainer, spec) if spec.time_budget else None
    moe = MoEMonitor(logging.empty_expert_warn_after, warn=progress.echo)
    t_start = time.perf_counter()
    elapsed0 = trainer.elapsed_s
    last_eval: dict | None = None
    status, code = "completed", EXIT_OK

    def save(best: bool = False) -> Path | None:
        trainer.elapsed_s = elapsed0 + time.perf_counter() - t_start
        model_state = runtime.model_state(trainer.raw_model)    # every rank: FSDP gathers the shards
        state = trainer.state_dict()
        if not main:
            return None
        return run.checkpoints.save(trainer.step_count, trainer.raw_model, state, best=best,
                                    model_state=model_state)

    try:
        with GracefulStop() as stop:
            t_log, steps_since_log = time.perf_counter(), 0
            while trainer.step_count < trainer.total_steps:
                t_step = clock()
                result = trainer.step()
                dt = clock() - t_step
                trainer.train_time_s += dt
                step = trainer.step_count
                total = trainer.total_steps
                if budget is not None:
                    event = budget.after_step(dt)
                    if trainer.total_steps != total:
                        total = trainer.total_steps
                        progress.set_total(total)
                    if event is not None:
                        metrics.write({"kind": "budget", "step": step, "total_steps": total,
                                       "ms_per_step": 1000 * budget.per_step, "time_budget_s": budget.seconds,
                                       "final": event == "final"})
                        progress.echo(budget_line(spec.time_budget, event, step, total, budget))
                    out_of_time = runtime.any_rank(budget.out_of_time()) and step < total   # all ranks alike
                else:
                    out_of_time = False
                stopping = runtime.any_rank(stop.signum is not None)   # all ranks stop at the same step
                steps_since_log += 1
                progress.update(1)
                paused = False
                if spec.is_log_step(step, total) or out_of_time:
                    trainer.check_deferred()
                    now = time.perf_counter()
                    row = train_row(trainer, result, moe, steps_since_log, now - t_log, elapsed0 + now - t_start)
                    metrics.write(row)
                    progress.update(0, loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                    **({"mfu": f"{row['mfu']:.1%}"} if row.get("mfu") is not None else {}))
                    t_log, steps_since_log = now, 0
                best = False
                if spec.is_eval_step(step, total) or out_of_time:
                    last_eval = trainer.evaluate()
                    best = last_eval["val_loss"] < trainer.best_val_loss
                    if best:
                        trainer.best_val_loss, trainer.best_step = last_eval["val_loss"], step
                    metrics.write({"kind": "eval", "step": step, "tokens": trainer.tokens_seen, **last_eval,
                                   "best_val_loss": trainer.best_val_loss})
                    progress.echo(f"step {step}: val loss {last_eval['val_loss']:.4f}"
                                  + (f", {last_eval['val_bpb']:.4f} bpb" if last_eval["val_bpb"] else "")
                                  + "".join(f", {k} {v:.4f}" for k, v in last_eval.items()  # e.g. val_acc
                                            if k not in ("val_loss", "val_bpb") and isinstance(v, float))
                                  + (" (best)" if best else ""))
                    if logging.plots and main:
                        _plots(run, metrics.rows, moe, name, step)
                    paused = True
                for extra in evals:
                    if extra.due(step, spec, total) or out_of_time:
                        row = metrics.write({"kind": "eval", "step": step, "tokens": trainer.tokens_seen,
                                             **extra(trainer)})
                        progress.echo(f"step {step}: {extra.line(row)}")
                        paused = True
                if spec.is_checkpoint_step(step, total) or (best and spec.keep_best) or stopping or out_of_time:
                    save(best=best and spec.keep_best)
                    paused = True
                if out_of_time:
                    status = "out of time"
                    progress.echo(f"time budget {spec.time_budget} spent after step {step} of {total}: stopped, "
                                  "checkpoint saved")
                    break
                if stopping:
                    signum = stop.signum or signal.SIGTERM      # another rank's signal
                    status = "interrupted"
                    code = 128 + signum
                    progress.echo(f"{signal.Signals(signum).name} received: checkpoint saved at step {step}; "
                                  f"continue with: python -m nanodecoder.run --resume {run}")
                    break
                if paused:  # eval/checkpoint time is not training throughput
                    t_log, steps_since_log = time.perf_counter(), 0
    except NonFiniteLoss as e:
        status, code = "non-finite", EXIT_NONFINITE
        progress.echo(f"error: {e}")
    finally:
        progress.close()
        metrics.close()
    wall = elapsed0 + time.perf_counter() - t_start
    if status == "completed" and sample.enabled:
        _write_samples(trainer, tokenizer, sample, run)
    files = [f for f in (RunDir.METRICS, RunDir.LOSS_PLOT, RunDir.LOAD_PLOT, RunDir.SAMPLES, "ckpt/")
             if (run / f.rstrip("/")).exists()]
    out(end_summary(status=status, trainer=trainer, run_dir=run, wall_s=wall, last_eval=last_eval, files=files))
    if main:
        run.update_meta(status=status, step=trainer.step_count, best_val_loss=_finite(trainer.best_val_loss),
                        best_step=trainer.best_step, wall_s=wall)
    if wandb_run is not None:
        finish_wandb(wandb_run, {"best_val_loss": _finite(trainer.best_val_loss), "status": status}, code)
    return RunResult(status, trainer.step_count, trainer.best_val_loss, trainer.best_step, last_eval,
                     run.path, wall, code)


def _quiet(text: str) -> None:
    pass


def train_row(trainer: Trainer, result, moe: MoEMonitor, steps: int, seconds: float, elapsed: float) -> dict:
    """The metrics row of a log step (the only place the step's loss is synced from the device)."""
    seconds = max(seconds, 1e-9)
    row = {"kind": "train", "step": trainer.step_count, "tokens": trainer.tokens_seen,
           "loss": result.loss.item(), "lr": result.lr,
           "tokens_per_s": steps * trainer.tokens_per_step / seconds, "ms_per_step": 1000 * seconds / steps,
           "elapsed_s": elapsed}
    row["flops_per_s"], row["mfu"] = trainer.runtime.mfu(row["tokens_per_s"], trainer.flops_per_token)
    if result.grad_norm is not None:
        row["grad_norm"] = result.grad_norm.item()
    if result.aux_loss is not None:
        row["aux_loss"] = result.aux_loss.item()
    if trainer.skipped:
        row["skipped_steps"] = trainer.skipped
    row.update(moe.metrics(result.stats, trainer.step_count))
    return row


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _plots(run: RunDir, rows, moe: MoEMonitor, name: str, step: int) -> None:
    plot_losses(rows, run / RunDir.LOSS_PLOT, title=name)
    if moe.load:
        plot_expert_load(moe.load, run / RunDir.LOAD_PLOT, step)


def _write_samples(trainer: Trainer, tokenizer, sample, run: RunDir) -> None:
    with trainer.runtime.eager():   # every rank (FSDP forwards are collective); rank 0 writes
        texts = sample_text(trainer.raw_model, tokenizer, sample.prompt, max_new_tokens=sample.max_new_tokens,
                            temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p,
                            seed=sample.seed, num_samples=sample.num_samples, device=trainer.runtime.device)
    if not trainer.runtime.is_main:
        return
    header = (f"# step {trainer.step_count}, temperature {sample.temperature}, top_k {sample.top_k}, "
              f"top_p {sample.top_p}, seed {sample.seed}\n")
    (run / RunDir.SAMPLES).write_text(header + "\n\n---\n\n".join(texts) + "\n")
