"""Time the training step of a blueprint: tokens/s, ms/step (after warm-up), peak memory.

    python tools/bench.py blueprints/nanogpt_cpu_char.yaml --steps 50 [--warmup 5] [--set train.batch_size=16]
    python tools/bench.py BLUEPRINT --steps 2000 --eval     # also train to the end and report val loss
    python tools/bench.py blueprints/gpt2_124m.yaml --synthetic --profile gpu_mixed --set runtime.compile=true

``--synthetic`` feeds uniformly random tokens instead of the blueprint's data:
nothing is prepared or downloaded (no tokenizer files needed), so an
architecture can be timed anywhere.  It needs an explicit ``model.vocab_size``
(or ``--vocab N``).  The step, optimizer and runtime are the real ones.

Runs the real Trainer step (the one ``python -m nanodecoder.run`` uses) with no
run directory, no logging and no checkpoints.  Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's maximum resident
set (``getrusage``) on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SyntheticError(Exception):
    pass


class RandomBatches:
    """Uniformly random token batches of the trainer's shape (the ``next_batch`` interface)."""

    def __init__(self, batch: int, context: int, vocab: int, seed: int):
        self.shape, self.vocab = (batch, context + 1), vocab
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        seq = torch.randint(self.vocab, self.shape, generator=self.gen)
        return seq[:, :-1], seq[:, 1:]


def build_trainer(blueprint: str, overrides: list[str], synthetic: bool = False, vocab: int | None = None):
    """The blueprint's real Trainer (model built and placed), no run directory.  Data: the
    blueprint's, prepared, or with ``synthetic`` random tokens (``vocab``: for ``vocab_size: auto``)."""
    from nanodecoder.api.throughput import build_timing_trainer
    from nanodecoder.cli.blueprint import run_spec
    from nanodecoder.cli.run import load, prepare
    bp, _, base_dir, _ = load(argparse.Namespace(blueprint=blueprint, overrides=overrides, resume=None))
    if synthetic:
        prep, spec = None, run_spec(bp, vocab_size=vocab)
        if spec.model.vocab_size == "auto":
            raise SyntheticError("--synthetic: model.vocab_size is 'auto' and no tokenizer is prepared; "
                                 "give it with --vocab N")
    else:
        prep, spec = prepare(bp, base_dir)

    def random_batches(runtime):
        return RandomBatches(runtime.local_batch(spec.train.batch_size), spec.model.context_length,
                             spec.model.vocab_size, spec.train.seed + runtime.rank)

    trainer, runtime = build_timing_trainer(spec, prep, batches=random_batches if synthetic else None)
    return bp, spec, runtime, trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("blueprint")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--eval", action="store_true", help="evaluate on the validation split after the timed steps")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of the blueprint's data")
    p.add_argument("--vocab", type=int, default=None, help="with --synthetic: vocabulary for 'vocab_size: auto'")
    p.add_argument("--profile", default=None, help="runtime profile (same as --set runtime.profile=NAME)")
    args = p.parse_args(argv)
    if args.eval and args.synthetic:
        p.error("--eval needs the blueprint's data; leave out --synthetic")
    if args.profile:
        args.overrides.append(f"runtime.profile={args.profile}")

    from nanodecoder.cli.common import fail, user_errors
    from nanodecoder.model.params import count_params
    try:
        bp, spec, runtime, trainer = build_trainer(args.blueprint, args.overrides, args.synthetic, args.vocab)
    except (*user_errors(), SyntheticError) as e:
        return fail(e)
    report = count_params(trainer.raw_model)
    print(f"{bp.name}: {report.total:,} params ({report.active:,} active), {trainer.tokens_per_step:,} tokens/step, "
          f"{runtime.describe()}")
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        trainer.step()
    runtime.synchronize()
    warm_s = time.perf_counter() - t_warm          # includes torch.compile's compilation
    times = []
    out = None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = trainer.step()
        if not trainer.check_each_step:
            runtime.synchronize()
        times.append(time.perf_counter() - t0)
    loss = out.loss.item() if out is not None else float("nan")
    total = sum(times)
    tok_s = args.steps * trainer.tokens_per_step / total if total else float("nan")
    mem = runtime.peak_memory_bytes() / 2**20
    flops, mfu = runtime.mfu(tok_s, trainer.flops_per_token)
    print(f"steps {args.steps} (after {args.warmup} warm-up): {1000 * total / args.steps:.2f} ms/step mean, "
          f"{1000 * statistics.median(times):.2f} median, {tok_s:,.0f} tokens/s, "
          f"{flops / 1e9:.2f} GFLOP/s" + (f", MFU {mfu:.1%}" if mfu is not None else "") + ", "
          f"peak memory {mem:,.0f} MiB ({runtime.memory_label}), last train loss {loss:.4f}")
    print(f"warm-up {warm_s:.1f} s (includes compilation); peak "
          + (f"{runtime.peak_flops / 1e9:,.1f} GFLOP/s per device" if runtime.peak_flops else "unknown")
          + f" ({runtime.peak_source})")
    if args.eval:
        ev = trainer.evaluate()
        bpb = f", {ev['val_bpb']:.4f} bpb" if ev["val_bpb"] else ""
        print(f"val loss after {trainer.step_count} steps: {ev['val_loss']:.4f}{bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
