#!/usr/bin/env python
"""Compare finished (or running) runs: validation loss against wall-clock time and tokens.

    python tools/compare_runs.py runs/dense_gpt/<ts> runs/moe_gpt/<ts> --out compare.png
    python tools/compare_runs.py RUN --nanogpt-log nanogpt.log     # with nanoGPT's train.py stdout

Prints, for each run, the validation loss reached by equal amounts of training
time (eval pauses excluded: the x axis is the trainer's ``elapsed_s``; linear
between evaluations) and at the end of each run, and
draws one PNG with both views.  This is how the MoE-vs-dense claim of the
README is checked: at equal wall-clock the MoE twin should be lower.

``--nanogpt-log`` adds a run of nanoGPT's ``train.py`` from its printed log
(``tools/bench_nanogpt.py --keep DIR`` keeps it): its ``iter N: ... time Xms``
lines give the training time (an iteration right after an evaluation, whose
time includes the evaluation, counts as the median iteration) and its
``step N: ... val loss V`` lines the (20-batch estimate of the) validation loss.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import re  # noqa: E402
import statistics  # noqa: E402

from nanodecoder.train.metrics import read_rows  # noqa: E402
from nanodecoder.train.plots import _pyplot, _save  # noqa: E402


def val_curve(run: Path) -> list[dict]:
    """Eval rows with the training time (``elapsed_s``) of the train row logged at the same step."""
    rows = read_rows(run / "metrics.jsonl")
    elapsed, points = {}, []
    for r in rows:
        if r.get("kind") == "train":
            elapsed[r["step"]] = r["elapsed_s"]
        elif r.get("kind") == "eval" and r.get("val_loss") is not None:
            t = elapsed.get(r["step"])
            if t is not None:
                points.append({"step": r["step"], "tokens": r["tokens"], "elapsed_s": t, "val_loss": r["val_loss"]})
    return points


NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def nanogpt_curve(log: Path, tokens_per_iter: int) -> list[dict]:
    """The evaluations of a nanoGPT ``train.py`` log, at the training time before each (evaluation pauses
    left out, as our ``elapsed_s`` leaves them out)."""
    times, evals = {}, []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := NANOGPT_ITER.match(line):
            times[int(m.group(1))] = float(m.group(2)) / 1000
        elif m := NANOGPT_EVAL.match(line):
            evals.append((int(m.group(1)), float(m.group(2))))
    if not times or not evals:
        raise SystemExit(f"{log}: no nanoGPT 'iter N: ... time Xms' and 'step N: ... val loss' lines "
                         "(run train.py with --log_interval=1)")
    after_eval = {step for step, _ in evals}
    typical = statistics.median(t for i, t in times.items() if i not in after_eval)
    points, elapsed, done = [], 0.0, 0
    for step, val in evals:                      # evaluation at iter N happens before iteration N runs
        elapsed += sum(typical if i in after_eval else times.get(i, typical) for i in range(done, step))
        done = step
        points.append({"step": step, "tokens": step * tokens_per_iter, "elapsed_s": elapsed, "val_loss": val})
    return points


def loss_at(points: list[dict], seconds: float) -> float | None:
    """Validation loss after ``seconds`` of training, linear between the two evals around it.

    Reading the last eval before ``seconds`` instead would favour whichever run
    happened to evaluate just before the mark.  ``None`` before the first eval
    or after the last one.
    """
    for a, b in zip(points, points[1:]):
        if a["elapsed_s"] <= seconds <= b["elapsed_s"]:
            span = b["elapsed_s"] - a["elapsed_s"]
            w = 0.0 if span <= 0 else (seconds - a["elapsed_s"]) / span
            return a["val_loss"] + w * (b["val_loss"] - a["val_loss"])
    if points and seconds == points[-1]["elapsed_s"]:
        return points[-1]["val_loss"]
    return None


def label(run: Path) -> str:
    info = run / "run.json"
    if info.is_file():
        return json.loads(info.read_text()).get("name", run.parent.name)
    return run.parent.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run directories")
    ap.add_argument("--nanogpt-log", type=Path, action="append", default=[],
                    help="a log of nanoGPT's train.py (stdout, --log_interval=1), drawn as 'nanoGPT train.py'")
    ap.add_argument("--nanogpt-tokens", type=int, default=12 * 64,
                    help="tokens per nanoGPT iteration (default 768: the README CPU recipe)")
    ap.add_argument("--out", type=Path, default=Path("compare.png"), help="PNG to write (default compare.png)")
    args = ap.parse_args(argv)
    if not args.runs and not args.nanogpt_log:
        ap.error("give run directories and/or --nanogpt-log")
    curves = {label(r): val_curve(r) for r in args.runs}
    for i, log in enumerate(args.nanogpt_log):
        curves["nanoGPT train.py" + (f" ({i + 1})" if len(args.nanogpt_log) > 1 else "")] = \
            nanogpt_curve(log, args.nanogpt_tokens)
    common = min((c[-1]["elapsed_s"] for c in curves.values() if c), default=0.0)
    marks = [common * f for f in (0.25, 0.5, 0.75, 1.0)]
    print(f"{'run':<24}" + "".join(f"{f'@{m:.0f}s':>12}" for m in marks)
          + f"{'final':>10}{'at (s)':>8}{'steps':>8}{'tok/s':>10}")
    for name, pts in curves.items():
        if not pts:
            print(f"{name:<24} (no evaluations yet)")
            continue
        cells = "".join(f"{v:>12.4f}" if (v := loss_at(pts, m)) is not None else f"{'-':>12}" for m in marks)
        last = pts[-1]
        print(f"{name:<24}{cells}{last['val_loss']:>10.4f}{last['elapsed_s']:>8.0f}{last['step']:>8}"
              f"{last['tokens'] / last['elapsed_s']:>10,.0f}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        for ax, x in zip(axes, ("elapsed_s", "tokens")):
            ax.plot([p[x] for p in pts], [p["val_loss"] for p in pts], "o-", ms=3, label=name)
    for ax, x in zip(axes, ("training wall-clock (s)", "tokens")):
        ax.set_xlabel(x)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
