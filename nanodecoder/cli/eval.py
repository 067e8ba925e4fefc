"""Evaluate a trained run: HellaSwag accuracy, or loss and bits per byte on any text.

    python -m nanodecoder.eval RUN_DIR --task hellaswag --data hellaswag_val.jsonl [--limit 1000]
    python -m nanodecoder.eval RUN_DIR --task text --data held_out.txt [--stride 64]

HellaSwag data: ``data/hellaswag_val.jsonl`` of https://github.com/rowanz/hellaswag
(10,042 validation items).  ``acc`` picks the ending with the largest summed
log-likelihood, ``acc_norm`` the largest mean log-likelihood per ending token.
``--json`` prints one JSON object instead of the summary line.  Bad input
prints one message and exits 2.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..eval.hellaswag import evaluate_hellaswag
from ..eval.text import evaluate_text, read_text
from .common import EXIT_USAGE, fail, user_errors
from .sample import load_run_model

TASKS = ("hellaswag", "text")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nanodecoder.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory (<runs_dir>/<name>/<timestamp>)")
    p.add_argument("--task", choices=TASKS, required=True, help="hellaswag, or text (loss and bits per byte)")
    p.add_argument("--data", type=Path, required=True, help="HellaSwag JSONL file, or a UTF-8 text file")
    p.add_argument("--limit", type=int, default=None, help="hellaswag: score only the first N items")
    p.add_argument("--stride", type=int, default=None,
                   help="text: tokens between window starts (default context_length: non-overlapping chunks)")
    p.add_argument("--batch-size", type=int, default=8, help="items (hellaswag) or windows (text) per batch")
    p.add_argument("--checkpoint", default="best", help="best, latest, or a folder name like step_000500")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p.parse_args(argv)


def run(args) -> dict:
    if args.limit is not None and args.limit < 1 or args.batch_size < 1 or \
            (args.stride is not None and args.stride < 1):
        raise ValueError("need --limit >= 1, --batch-size >= 1 and --stride >= 1")
    model, tokenizer, ckpt, _ = load_run_model(args.run_dir, args.checkpoint, args.device, lm_only=True,
                                               task="evaluate text with")
    t0 = time.perf_counter()
    if args.task == "hellaswag":
        result = evaluate_hellaswag(model, tokenizer, args.data, limit=args.limit, batch_size=args.batch_size,
                                    device=args.device)
    else:
        result = evaluate_text(model, tokenizer, read_text(args.data), stride=args.stride,
                               batch_size=args.batch_size, device=args.device, name=str(args.data))
    result.update({"data": str(args.data), "checkpoint": str(ckpt), "seconds": round(time.perf_counter() - t0, 3)})
    return result


def summary(r: dict) -> str:
    if r["task"] == "hellaswag":
        skipped = f" ({r['skipped']} items skipped: the tokenizer cannot encode them)" if r["skipped"] else ""
        return (f"hellaswag: {r['n']} items{skipped}: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} "
                f"(normalization: {r['acc_norm_normalization']}) [{r['checkpoint']}, {r['seconds']:.1f} s]")
    return (f"text {r['data']}: {r['tokens']:,} tokens, {r['bytes']:,} bytes: loss {r['loss']:.4f} nats/token, "
            f"{r['bpb']:.4f} bits/byte, perplexity {r['perplexity']:.2f} (stride {r['stride']}) "
            f"[{r['checkpoint']}, {r['seconds']:.1f} s]")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (*user_errors(), ValueError) as e:
        return fail(e, EXIT_USAGE)
    print(json.dumps(result) if args.json else summary(result))
    return 0
