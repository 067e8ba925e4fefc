"""What a :class:`~nanodecoder.train.loop.TrainingLoop` does around its optimizer steps, one hook each.

:func:`standard_hooks` is a training run's list, in the order they act after a step: the time budget (it may
shorten the run and end it), the metrics row of a log step, the validation evaluation (best, plots), the periodic
evaluations of ``eval:``, the checkpoint (due, best, or the run stops), and at the end the final sample.
"""
from __future__ import annotations

import time
from typing import Sequence

from ..model.generate import sample_text
from .loop import EXIT_OK, Hook, Step, Stop, TimeBudget, TrainingLoop, budget_line
from .metrics import MoEMonitor
from .plots import plot_expert_load, plot_losses
from .rundir import RunDir
from .trainer import Trainer


class TimeBudgetHook(Hook):
    """``train.time_budget``: fix (and re-plan) the step count from the steps' speed; stop when it is spent."""

    def __init__(self, trainer: Trainer):
        self.budget = TimeBudget(trainer, trainer.spec)

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        trainer, budget, text = loop.trainer, self.budget, loop.trainer.spec.time_budget
        event = budget.after_step(step.seconds)
        if trainer.total_steps != step.total:
            step.total = trainer.total_steps
            loop.progress.set_total(step.total)
        if event is not None:
            loop.metrics.write({"kind": "budget", "step": step.number, "total_steps": step.total,
                                "ms_per_step": 1000 * budget.per_step, "time_budget_s": budget.seconds,
                                "final": event == "final"})
            loop.progress.echo(budget_line(text, event, step.number, step.total, budget))
        # all ranks alike
        if trainer.runtime.any_rank(budget.out_of_time()) and step.number < step.total:
            step.out_of_time = True
            step.stop = Stop("out of time", EXIT_OK, f"time budget {text} spent after step {step.number} of "
                                                     f"{step.total}: stopped, checkpoint saved")


class LogHook(Hook):
    """The progress bar, and a metrics row (loss, throughput, MFU, MoE loads) on each log step."""

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        loop.steps_since_log += 1
        loop.progress.update(1)
        if loop.trainer.spec.is_log_step(step.number, step.total) or step.out_of_time:
            loop.trainer.check_deferred()
            now = time.perf_counter()
            row = train_row(loop.trainer, step.result, loop.moe, loop.steps_since_log, now - loop.t_log,
                            loop.elapsed0 + now - loop.t_start)
            loop.metrics.write(row)
            loop.progress.update(0, loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                 **({"mfu": f"{row['mfu']:.1%}"} if row.get("mfu") is not None else {}))
            loop.t_log, loop.steps_since_log = now, 0


class EvalHook(Hook):
    """The validation evaluation on each eval step: its row, its line, the best so far, the plots."""

    def __init__(self, plots: bool, name: str):
        self.plots, self.name = plots, name

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        trainer = loop.trainer
        if not (trainer.spec.is_eval_step(step.number, step.total) or step.out_of_time):
            return
        ev = loop.last_eval = trainer.evaluate()
        step.best = ev["val_loss"] < trainer.best_val_loss
        if step.best:
            trainer.best_val_loss, trainer.best_step = ev["val_loss"], step.number
        loop.metrics.write({"kind": "eval", "step": step.number, "tokens": trainer.tokens_seen, **ev,
                            "best_val_loss": trainer.best_val_loss})
        loop.progress.echo(f"step {step.number}: val loss {ev['val_loss']:.4f}"
                           + (f", {ev['val_bpb']:.4f} bpb" if ev["val_bpb"] else "")
                           + "".join(f", {k} {v:.4f}" for k, v in ev.items()  # e.g. val_acc
                                     if k not in ("val_loss", "val_bpb") and isinstance(v, float))
                           + (" (best)" if step.best else ""))
        if self.plots and loop.main:
            plot_losses(loop.metrics.rows, loop.run / RunDir.LOSS_PLOT, title=self.name)
            if loop.moe.load:
                plot_expert_load(loop.moe.load, loop.run / RunDir.LOAD_PLOT, step.number)
        step.paused = True


class PeriodicEvalsHook(Hook):
    """The ``eval:`` section's evaluations (``nanodecoder.eval.PeriodicEval``), each when it is due, as eval
    rows of their own."""

    def __init__(self, evals: Sequence):
        self.evals = tuple(evals)

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        for extra in self.evals:
            if extra.due(step.number, loop.trainer.spec, step.total) or step.out_of_time:
                row = loop.metrics.write({"kind": "eval", "step": step.number, "tokens": loop.trainer.tokens_seen,
                                          **extra(loop.trainer)})
                loop.progress.echo(f"step {step.number}: {extra.line(row)}")
                step.paused = True


class CheckpointHook(Hook):
    """A checkpoint on each checkpoint step, on a new best (``keep_best``), and before the run stops."""

    def after_step(self, loop: TrainingLoop, step: Step) -> None:
        spec = loop.trainer.spec
        best = step.best and spec.keep_best
        if spec.is_checkpoint_step(step.number, step.total) or best or step.stop is not None:
            loop.save(best=best)
            step.paused = True


class SampleHook(Hook):
    """The final sample (``sample:``) of a completed run, written to ``samples.txt``."""

    def __init__(self, sample, tokenizer):
        self.sample, self.tokenizer = sample, tokenizer

    def end(self, loop: TrainingLoop) -> None:
        if loop.status != "completed" or not self.sample.enabled:
            return
        trainer, sample = loop.trainer, self.sample
        with trainer.runtime.eager():   # every rank (FSDP forwards are collective); rank 0 writes
            texts = sample_text(trainer.raw_model, self.tokenizer, sample.prompt,
                                max_new_tokens=sample.max_new_tokens, temperature=sample.temperature,
                                top_k=sample.top_k, top_p=sample.top_p, seed=sample.seed,
                                num_samples=sample.num_samples, device=trainer.runtime.device)
        if not trainer.runtime.is_main:
            return
        header = (f"# step {trainer.step_count}, temperature {sample.temperature}, top_k {sample.top_k}, "
                  f"top_p {sample.top_p}, seed {sample.seed}\n")
        (loop.run / RunDir.SAMPLES).write_text(header + "\n\n---\n\n".join(texts) + "\n")


def standard_hooks(trainer: Trainer, *, logging, sample, tokenizer, name: str, evals: Sequence = ()) -> list[Hook]:
    """A training run's hooks, in the order they act (see the module docstring)."""
    budget = [TimeBudgetHook(trainer)] if trainer.spec.time_budget else []
    return [*budget, LogHook(), EvalHook(logging.plots, name), PeriodicEvalsHook(evals), CheckpointHook(),
            SampleHook(sample, tokenizer)]


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
