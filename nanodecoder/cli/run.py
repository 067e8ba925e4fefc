"""Train a model from a blueprint.

    python -m nanodecoder.run BLUEPRINT [--set key=value ...] [--dry-run] [--print-config]
    python -m nanodecoder.run [BLUEPRINT] --resume RUN_DIR [--checkpoint step_000040] [--set train.steps=4000]
    python -m nanodecoder.run BLUEPRINT --profile gpu_mixed [--set runtime.compile=true]
    torchrun --nproc_per_node=8 -m nanodecoder.run BLUEPRINT --profile multi_gpu_compile

A run writes ``<runs_dir>/<name>/<timestamp>/``: the resolved ``blueprint.yaml``,
``metrics.jsonl``, ``loss.png``, ``ckpt/``, ``samples.txt`` and the tokenizer.
Ctrl-C or SIGTERM saves a checkpoint and exits; ``--resume`` continues exactly from
the latest checkpoint, with the run's saved blueprint, or with BLUEPRINT when one
is given (changed keys are listed; a changed ``model:`` section is refused key by key
unless ``--allow-architecture-change``, which still needs every tensor's shape to match).
One process trains a run folder at a time (under torchrun, rank 0 for all ranks): it holds the folder's lock
``.lock`` (``train/rundir.py``; the OS frees it when the process ends, however it ends), so a ``--resume`` of a
run still training is refused (exit 2, naming the trainer's PID); sampling, evaluation and export take no lock
and read the newest complete checkpoint meanwhile.

The run itself, prepare -> plan -> train, is :class:`~nanodecoder.api.run.Run`; this module parses the command
line and loads the blueprint (resuming: the run's saved one too).

``--dry-run`` validates, runs training's checks that need no prepared data (``api/preflight.py``:
the profile on this machine, the run folder, the data and eval files, the prompt where the tokenizer is known)
without tokenizing the corpus, builds nothing (not even on the meta device) and prints the parameter table,
the plan and the memory plan per process for the chosen profile (with and without activation checkpointing)
against the memory available here, then the checks that wait for the prepared data; a blueprint with
``model.vocab_size`` and no data section is planned offline.  Training checks the same plan before it builds the
weights, and before it prepares the data where the vocabulary is known without the corpus (byte, bpe, tiktoken;
``runtime.check_memory: false`` skips the check).

Exit codes: 0 done; 2 an error in the blueprint, the data, a checkpoint or a
profile this machine cannot run (one message, no traceback); 3 training stopped
at a non-finite loss; 4 the run does not fit in memory (``--dry-run`` prints the
whole plan and what does not fit; training refuses before building anything);
a size no machine can build (a weight tensor past the 2**63 - 1 bytes torch can hold) is a
blueprint error (2, naming the key), any smaller size that is too big for this machine a 4;
5 under torchrun, another process died or stopped answering (``runtime.timeout_s``) during a collective
(one line names it; ``--resume`` continues from the last complete checkpoint, with any number of processes);
128 + N after signal N (a checkpoint was saved); 130 Ctrl-C during set-up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from .. import __version__
from ..api.run import Run
from ..config import Blueprint
from ..runtime import AUTO, available_profiles
from ..train.loop import ALLOW_ARCHITECTURE_CHANGE, EXIT_RANK_LOST, RankLost
from ..train.memory import WontFit
from ..train.rundir import RunDir
from .blueprint import load_blueprint
from .common import EXIT_USAGE, EXIT_WONT_FIT, fail, user_errors


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m nanodecoder.run", description=__doc__.split("\n\n")[0])
    p.add_argument("blueprint", nargs="?",
                   help="a blueprint file, or the name of a shipped one (optional with --resume)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a blueprint value (dotted key), e.g. --set train.steps=100; repeatable")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--checkpoint", default="latest", metavar="NAME",
                   help="with --resume: the checkpoint to continue from, 'latest' (default), 'best' or a folder "
                        "name such as step_000040 (later checkpoints move to ckpt/superseded/)")
    p.add_argument(ALLOW_ARCHITECTURE_CHANGE, dest="allow_architecture_change", action="store_true",
                   help="with --resume: load the checkpoint even though the model section changed (the tensors "
                        "must keep their names and shapes; the changes are listed and recorded in run.json)")
    p.add_argument("--profile", choices=_profiles(), metavar="NAME",
                   help="runtime profile (overrides runtime.profile): " + ", ".join(_profiles()))
    p.add_argument("--dry-run", action="store_true",
                   help="validate, run training's checks that need no prepared data (exit 2 on a problem), print "
                        "the plan and the memory plan from the spec alone (exit 4 when it does not fit); nothing "
                        "is built, tokenized or trained")
    p.add_argument("--print-config", action="store_true", help="print the resolved blueprint (YAML) and exit")
    args = p.parse_args(argv)
    if args.checkpoint != "latest" and args.resume is None:
        p.error("--checkpoint needs --resume RUN_DIR")
    if args.allow_architecture_change and args.resume is None:
        p.error(f"{ALLOW_ARCHITECTURE_CHANGE} needs --resume RUN_DIR")
    if args.blueprint is None and args.resume is None:
        p.error("give a BLUEPRINT, or --resume RUN_DIR")
    return args


def _profiles() -> list[str]:
    return [AUTO, *available_profiles()]


class Loaded(NamedTuple):
    bp: Blueprint                 # the blueprint to run
    run: RunDir | None            # the run folder when resuming
    base_dir: Path                # where relative data paths start
    saved: dict | None            # resuming: the run's saved blueprint (to list what changed)


def load(args) -> Loaded:
    """The blueprint to run, read once (resuming: the run's saved one too, once)."""
    if args.resume is None:
        bp = load_blueprint(args.blueprint, args.overrides)
        return Loaded(bp, None, Path(bp.path).resolve().parent, None)
    run = RunDir.open(args.resume)
    meta = run.meta()
    saved = load_blueprint(run / RunDir.BLUEPRINT)
    if args.blueprint is not None:
        bp = load_blueprint(args.blueprint, args.overrides)
        base_dir = Path(bp.path).resolve().parent
    else:
        bp = load_blueprint(run / RunDir.BLUEPRINT, args.overrides) if args.overrides else saved
        base_dir = Path(meta.get("base_dir", run.path))
    bp.name = meta.get("name", bp.name)
    return Loaded(bp, run, base_dir, saved.raw)


def prepare(bp, base_dir: Path):
    """``(prepared data or fine-tuning task, RunSpec)`` of a blueprint, as training prepares them (``tools/bench.py``
    and the distributed tests build their Trainer from these)."""
    return Run(bp, base_dir).prepare()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        args.overrides = [*args.overrides, f"runtime.profile={args.profile}"]
    try:
        bp, run, base_dir, saved = load(args)
        if args.print_config:
            print(bp.to_yaml(), end="")
            return 0
        job = Run(bp, base_dir, resume=run, saved=saved, checkpoint=args.checkpoint,
                  meta={"argv": sys.argv[1:], "nanodecoder": __version__})
        if run is not None:
            job.check_architecture(args.allow_architecture_change)
        return job.dry_run() if args.dry_run else job.train()
    except user_errors() as e:
        return fail(e, EXIT_USAGE)
    except WontFit as e:
        return fail(e, EXIT_WONT_FIT)
    except RankLost:          # the training loop printed which rank was lost and how to resume
        return EXIT_RANK_LOST
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up
        print("aborted (no checkpoint written for the current step)", file=sys.stderr)
        return 130
