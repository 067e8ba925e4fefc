"""The one-screen summaries printed at the start and at the end of a run."""
from __future__ import annotations

import math

from ..config.declare import to_yaml
from ..data import unigram_loss


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _params(spec) -> str:
    """A built ``train.optimizer`` / ``train.schedule`` block's parameters, as ``(key=value, ...)``."""
    return "(" + ", ".join(f"{k}={v}" for k, v in to_yaml(spec).items() if k != "kind") + ")"


def start_summary(*, name: str, run_dir, params, trainer, runtime, train_tokens: int,
                  resumed_from: str | None = None) -> str:
    spec = trainer.spec
    total_tokens = spec.steps * trainer.tokens_per_step
    epochs = total_tokens / train_tokens if train_tokens else math.nan
    lines = [
        f"== nanodecoder run: {name} ==",
        f"  run dir        {run_dir}",
        f"  params         {human(params.total)} total, {human(params.active)} active per token "
        f"({human(params.non_embedding)} non-embedding)",
        f"  device         {runtime.describe()}",
        f"  FLOPs          {human(trainer.flops_per_token)} per token; peak "
        + (f"{runtime.peak_flops / 1e12:.3g} TFLOP/s per device ({runtime.peak_source})" if runtime.peak_flops
           else f"unknown ({runtime.peak_source})"),
        f"  batch          {spec.batch_size}"
        f"{f' ({trainer.local_batch} per rank x {runtime.world_size} ranks)' if runtime.world_size > 1 else ''}"
        f" x {trainer.context_length} tokens x {spec.grad_accum} accum = {trainer.tokens_per_step:,} tokens/step",
        f"  steps          {spec.steps:,} -> {human(total_tokens)} tokens ({epochs:.2f} epochs of "
        f"{human(train_tokens)} train tokens)" if not spec.time_budget else
        f"  steps          fixed by time_budget {spec.time_budget} after {spec.budget_probe_steps} timed steps, again "
        f"where the schedule starts to depend on it "
        f"({human(trainer.tokens_per_step)} tokens each, {human(train_tokens)} train tokens)"
        + (f": {trainer.total_steps:,}" if trainer.budget_fixed else ""),
        f"  optimizer      {spec.optimizer.kind} {_params(spec.optimizer)}, lr {spec.lr:g}, "
        f"schedule {spec.schedule.kind} {_params(spec.schedule)}",
        f"  eval           every {spec.eval_every or spec.steps} steps on {spec.eval_steps} batches; "
        f"checkpoint every {spec.checkpoint_every or spec.steps}",
    ]
    prep = getattr(trainer, "prep", None)
    if prep is not None and getattr(prep, "train", None) is not None and len(prep.val):
        vocab = prep.tokenizer.vocab_size
        lines.append(f"  baselines      uniform {math.log(vocab):.3f}, unigram {unigram_loss(prep):.3f} "
                     "nats/token (val loss should end well below both)")
    if resumed_from:
        lines.append(f"  resumed from   {resumed_from} (step {trainer.step_count})")
    return "\n".join(lines)


def memory_line(row: dict) -> str:
    """``max RSS 812 MiB (the model's 402 MiB; planned 380 MiB)``, the widest rank's, from a ``memory`` row."""
    peaks, added = row["peak_mib"], row["model_mib"]
    i = max(range(len(peaks)), key=peaks.__getitem__)
    who = f" on rank {i} of {len(peaks)}" if len(peaks) > 1 else ""
    planned = f"; planned {row['planned_mib']:,.0f} MiB per process" if row.get("planned_mib") is not None else ""
    return (f"{row['measure']} {peaks[i]:,.0f} MiB{who}, {added[i]:,.0f} MiB of it since before the model was "
            f"built{planned}")


def end_summary(*, status: str, trainer, run_dir, wall_s: float, last_eval: dict | None,
                files: list[str], memory: dict | None = None) -> str:
    best = trainer.best_val_loss
    lines = [f"== {status} at step {trainer.step_count:,} of {trainer.total_steps:,} "
             f"({human(trainer.tokens_seen)} tokens, wall time {duration(wall_s)}) =="]
    if trainer.spec.time_budget:
        lines.append(f"  time budget    {trainer.spec.time_budget}: {trainer.train_time_s:.1f} s in optimizer steps "
                     f"(compilation included), {max(0.0, wall_s - trainer.train_time_s):.1f} s elsewhere "
                     "(evaluation, checkpoints, set-up; not counted)")
    if math.isfinite(best):
        lines.append(f"  best val loss  {best:.4f} at step {trainer.best_step}")
    if last_eval:
        bpb = last_eval.get("val_bpb")
        lines.append(f"  last val loss  {last_eval['val_loss']:.4f}" + (f", {bpb:.4f} bits per byte" if bpb else ""))
    if trainer.skipped:
        lines.append(f"  skipped steps  {trainer.skipped} (non-finite loss)")
    if memory is not None:
        lines.append("  memory         " + memory_line(memory))
    lines.append(f"  files          {run_dir}/  " + ", ".join(files))
    return "\n".join(lines)
