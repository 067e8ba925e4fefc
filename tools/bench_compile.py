#!/usr/bin/env python
"""torch.compile vs eager: training throughput, MFU and loss agreement of one blueprint.

    python tools/bench_compile.py blueprints/dense_gpt.yaml --rounds 5 --steps 6
    python tools/bench_compile.py blueprints/moe_gpt.yaml --set runtime.compile_mode=max-autotune

Builds the blueprint's real Trainer twice in one process, eager
(``runtime.compile=false``) and compiled (``runtime.compile=true``), from the same
seed.  The compiled warm-up time is the compilation time.  Rounds of ``--steps``
timed steps then alternate between the two, so machine noise hits both alike;
prints the median ms/step, tokens/s, MFU against the runtime's peak (datasheet
or CPU calibration), the speed-up, the graphs torch.compile produced (a number
that keeps growing means recompiles) and the largest relative difference of the
per-step training losses.  Numbers, never asserts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_trainer  # noqa: E402


def timed(trainer, runtime, steps: int, losses: list[float]) -> float:
    runtime.synchronize()
    t0 = time.perf_counter()
    outs = [trainer.step() for _ in range(steps)]
    runtime.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    losses.extend(float(o.loss) for o in outs)
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("blueprint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round and variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from nanodecoder.cli.common import fail, user_errors
    from nanodecoder.runtime import graphs_compiled
    runs = {}
    try:
        for name, flag in (("eager", "false"), ("compiled", "true")):
            bp, spec, runtime, trainer = build_trainer(args.blueprint, [*args.overrides, f"runtime.compile={flag}"])
            losses: list[float] = []
            t0 = time.perf_counter()
            timed(trainer, runtime, args.warmup, losses)
            runs[name] = (trainer, runtime, [], losses, time.perf_counter() - t0)
    except user_errors() as e:
        return fail(e)
    for _ in range(args.rounds):
        for trainer, runtime, times, losses, _ in runs.values():
            times.append(timed(trainer, runtime, args.steps, losses))
    print(f"{bp.name}: {trainer.tokens_per_step:,} tokens/step, {runtime.describe()}; peak "
          + (f"{runtime.peak_flops / 1e9:,.1f} GFLOP/s" if runtime.peak_flops else "unknown")
          + f" ({runtime.peak_source})")
    rates = {}
    for name, (trainer, runtime, times, _, warm) in runs.items():
        ms = 1000 * statistics.median(times)
        rates[name] = trainer.tokens_per_step / (ms / 1000)
        flops, mfu = runtime.mfu(rates[name], trainer.flops_per_token)
        print(f"{name:<9} {ms:9.1f} ms/step  {rates[name]:>9,.0f} tokens/s  {flops / 1e9:7.2f} GFLOP/s"
              + (f"  MFU {mfu:6.1%}" if mfu is not None else "")
              + f"  (median of {len(times)} rounds; warm-up {args.warmup} steps {warm:.1f} s)")
    eager, compiled = runs["eager"][3], runs["compiled"][3]
    diff = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    print(f"compiled / eager = {rates['compiled'] / rates['eager']:.2f}x; {graphs_compiled()} graphs compiled; "
          f"largest relative loss difference over {len(eager)} steps {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
