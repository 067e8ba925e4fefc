"""``python -m nanodecoder.ckpt consolidate RUN_DIR [--checkpoint NAME] [--out DIR]``.

A sharded checkpoint (``train.checkpoint_format: sharded``, the default of FSDP and expert-parallel runs) is read
directly by ``sample``, ``eval``, fine-tuning and ``hf export``, and resumes on any number of processes; this
command writes it as a full checkpoint folder (``model.safetensors``, the full optimizer state), for tools that
take safetensors or to hand the weights on.  The default output is ``RUN_DIR/consolidated/<checkpoint name>``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..train.checkpoint import consolidate
from ..train.rundir import RunDir
from .common import fail, user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanodecoder.ckpt", description="Work on a run's checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write a sharded checkpoint as a full one (one set of safetensors)")
    c.add_argument("run_dir", type=Path, help="a run directory (<runs_dir>/<name>/<timestamp>)")
    c.add_argument("--checkpoint", default="latest", help="latest (default), best, or a folder name such as "
                                                          "step_000500")
    c.add_argument("--out", type=Path, default=None, help="the new checkpoint folder (default: "
                                                          "RUN_DIR/consolidated/<checkpoint name>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run = RunDir.open(args.run_dir)
        src = run.checkpoints.resolve(args.checkpoint)
        out = consolidate(src, args.out or run.path / "consolidated" / src.name)
    except user_errors() as e:
        return fail(e)
    print(f"{src} -> {out} (full checkpoint: model.safetensors, state.safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
