#!/usr/bin/env python
"""nanoGPT's README CPU recipe against ``blueprints/nanogpt_cpu_char.yaml``, side by side, alternating.

    python tools/bench_nanogpt.py --nanogpt path/to/nanoGPT [--rounds 2] [--steps 2000] [--set key=value ...]

Needs a checkout of https://github.com/karpathy/nanoGPT (and numpy, which its ``prepare.py`` uses). The
tiny-shakespeare text (``--text``, default the copy shipped in ``nanodecoder/data/corpora/``) is copied to
``data/shakespeare_char/input.txt`` of the checkout and ``prepare.py`` is run once (nothing is downloaded
when that file exists). Each round runs nanoGPT's ``train.py`` with the README's CPU flags, then our blueprint
(``--set`` values apply to ours, e.g. ``runtime.compile=true``), as subprocesses, one at a time.

Printed per run: steady-state ms/step and tokens/s (median of the logged training steps after the first 50,
evaluation steps excluded), the first step's time (compilation included), the whole wall
clock and the final val loss (nanoGPT's: its estimate over ``eval_iters`` random batches; ours: over
``eval_steps`` batches of the val split, the same estimate). Then the ratios ours / nanoGPT. Numbers only.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
TOKENS_PER_STEP = 12 * 64
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
VAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def prepare_nanogpt(checkout: Path, text: Path) -> None:
    data = checkout / "data" / "shakespeare_char"
    if not (data / "prepare.py").is_file():
        sys.exit(f"{checkout} is not a nanoGPT checkout (no data/shakespeare_char/prepare.py)")
    if not (data / "input.txt").is_file():
        shutil.copyfile(text, data / "input.txt")
    if not (data / "train.bin").is_file():
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True)


def run_nanogpt(checkout: Path, steps: int, out: Path, keep: Path | None = None) -> dict:
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *README_FLAGS,
           f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--out_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{proc.stderr[-2000:]}")
    if keep is not None:
        (keep / f"{out.name}.log").write_text(proc.stdout, encoding="utf-8")
    times, evals, val = {}, set(), None
    for line in proc.stdout.splitlines():
        if m := VAL.match(line):
            evals.add(int(m.group(1)))
            val = float(m.group(2))
        elif m := ITER.match(line):
            times[int(m.group(1))] = float(m.group(2))
    # nanoGPT's dt of an iteration that follows an evaluation includes the evaluation: leave those out
    steady = [ms for it, ms in times.items() if it > 50 and it not in evals]
    return {"ms_per_step": statistics.median(steady), "wall_s": wall, "val_loss": val, "first_step_s": times.get(0, 0) / 1000}


def run_ours(steps: int, overrides: list[str], runs: Path, keep: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "nanodecoder.run", str(ROOT / "blueprints" / "nanogpt_cpu_char.yaml"),
           "--set", f"train.steps={steps}", "--set", f"logging.runs_dir={runs}", "--set", "logging.progress=false",
           *[x for o in overrides for x in ("--set", o)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"nanodecoder failed:\n{proc.stderr[-2000:]}{proc.stdout[-2000:]}")
    (metrics,) = runs.glob("*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = {r["step"] for r in rows if r["kind"] == "eval"}
    steady = [r["ms_per_step"] for r in train if r["step"] > 50 and r["step"] not in evals]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"][-1]
    if keep is not None:
        shutil.move(str(metrics.parent), keep / runs.name)   # the run folder (metrics.jsonl, checkpoints)
    shutil.rmtree(runs, ignore_errors=True)
    return {"ms_per_step": statistics.median(steady), "wall_s": wall, "val_loss": val,
            "first_step_s": train[0]["ms_per_step"] / 1000 if train[0]["step"] == 1 else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    ap.add_argument("--text", type=Path, default=ROOT / "nanodecoder" / "data" / "corpora" / "tinyshakespeare.txt")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="keep nanoGPT's logs (DIR/nanogptN.log) and our run folders (DIR/oursN) there, e.g. for "
                         "tools/compare_runs.py DIR/ours0 --nanogpt-log DIR/nanogpt0.log")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for our blueprint (repeatable)")
    args = ap.parse_args(argv)
    prepare_nanogpt(args.nanogpt, args.text)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"nanoGPT": [], "nanodecoder": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in results:
                if name == "nanoGPT":
                    res = run_nanogpt(args.nanogpt, args.steps, Path(tmp) / f"nanogpt{r}", args.keep)
                else:
                    res = run_ours(args.steps, args.overrides, Path(tmp) / f"ours{r}", args.keep)
                results[name].append(res)
                print(f"round {r + 1} {name:<12} {res['ms_per_step']:6.2f} ms/step "
                      f"{TOKENS_PER_STEP / res['ms_per_step'] * 1000:>8,.0f} tokens/s  wall {res['wall_s']:6.1f} s  "
                      f"val {res['val_loss']:.4f}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("ms_per_step", "wall_s", "val_loss")}
           for n, rs in results.items()}
    a, b = med["nanoGPT"], med["nanodecoder"]
    print(f"\nmedians over {args.rounds} rounds, {args.steps} steps, {TOKENS_PER_STEP} tokens/step")
    for n, m in med.items():
        print(f"  {n:<12} {m['ms_per_step']:6.2f} ms/step  {TOKENS_PER_STEP / m['ms_per_step'] * 1000:>8,.0f} "
              f"tokens/s  wall {m['wall_s']:6.1f} s  val {m['val_loss']:.4f}")
    per_round = [n["ms_per_step"] / o["ms_per_step"] for n, o in zip(results["nanoGPT"], results["nanodecoder"])]
    print(f"  per round (each against the nanoGPT run just before it): "
          f"{', '.join(f'{x:.2f}x' for x in per_round)}")
    print(f"  steady-state tokens/s nanodecoder / nanoGPT = {a['ms_per_step'] / b['ms_per_step']:.2f}x; "
          f"wall clock {a['wall_s'] / b['wall_s']:.2f}x; val loss difference {b['val_loss'] - a['val_loss']:+.4f}")
    for n, rs in results.items():
        first = [r["first_step_s"] for r in rs if r["first_step_s"] is not None]
        if first:
            print(f"  {n}: first step {statistics.median(first):.2f} s (compilation, when on, happens there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
