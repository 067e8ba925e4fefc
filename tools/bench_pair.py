#!/usr/bin/env python
"""Training throughput of two blueprints measured in one process, as a ratio.

    python tools/bench_pair.py blueprints/dense_gpt.yaml blueprints/moe_gpt.yaml --rounds 6 --steps 5
    python tools/bench_pair.py BP BP --set-b runtime.precision=bf16      # two variants of one blueprint

Both real Trainers are built first; then rounds of ``--steps`` timed steps
alternate between them, so machine noise hits both alike.  Prints ms/step and
tokens/s per run (median over rounds) and B/A.  Numbers, never asserts.
``--set`` applies to both, ``--set-a`` / ``--set-b`` to one of them (after ``--set``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_trainer  # noqa: E402

from nanodecoder.api.throughput import alternate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and blueprint")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides applied to both blueprints")
    ap.add_argument("--set-a", dest="overrides_a", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides applied to the first only")
    ap.add_argument("--set-b", dest="overrides_b", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="overrides applied to the second only")
    args = ap.parse_args(argv)
    from nanodecoder.cli.common import fail, user_errors
    runs = {}
    for label, path, own in (("A", args.a, args.overrides_a), ("B", args.b, args.overrides_b)):
        try:
            bp, spec, runtime, trainer = build_trainer(path, args.overrides + own)
        except user_errors() as e:
            return fail(e)
        runs[f"{label} {bp.name}"] = (trainer, runtime)
        print(f"{label}: {bp.name}" + (f" with {' '.join(own)}" if own else ""))
    measured = alternate(list(runs.values()), rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    rates = {}
    for (name, (trainer, _)), times in zip(runs.items(), measured):
        ms = 1000 * statistics.median(times)
        rates[name] = trainer.tokens_per_step / (ms / 1000)
        print(f"{name:<26} {ms:9.1f} ms/step  {rates[name]:>10,.0f} tokens/s  (median of {len(times)} rounds)")
    (na, ra), (nb, rb) = rates.items()
    print(f"throughput {nb} / {na} = {rb / ra:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
