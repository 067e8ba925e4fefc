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

``--dry-run`` validates, runs training's checks that need no prepared data (``cli/preflight.py``:
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
128 + N after signal N (a checkpoint was saved); 130 Ctrl-C during set-up.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from .. import __version__
from ..config.declare import to_yaml
from ..data import DataError, check_fits, find_prepared, load_tokenizer, prepare_data, tokenizer_vocab_size
from ..finetune import dry_run as finetune_dry_run
from ..finetune import prepare_finetune
from ..model import build_model
from ..model.params import count_params
from ..model.plan import flops_per_token, param_report
from ..runtime import AUTO, RuntimeSetupError, available_profiles, describe_plan, setup_runtime
from ..train.loop import (ALLOW_ARCHITECTURE_CHANGE, architecture_changes, refuse_architecture_change,
                          resume_trainer, run_training)
from ..train.memory import WontFit, planned_check, refuse_if_too_big
from ..train.checkpoint import write_atomic_text
from ..train.rundir import RunDir, RunLock, lock_for_training
from ..train.trainer import Trainer, seed_everything
from ..train.wandb_log import start_wandb
from ..config import Blueprint, BlueprintError
from ..config.diff import differences
from ..config.loader import dotted
from .blueprint import load_blueprint, run_spec
from .common import EXIT_USAGE, EXIT_WONT_FIT, fail, user_errors
from .preflight import data_checks, preflight


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


def changed_keys(old, new) -> list[str]:
    """Dotted keys whose values differ between two resolved blueprints (an absent key equals a null one)."""
    return [dotted(d.path) for d in differences(old, new, missing=None)]


def architecture_changes_on_resume(bp, saved: dict, run: RunDir, allow: bool = False) -> list[str]:
    """The changes to the model section (defaults filled in, ``vocab_size: auto`` resolved with the run's
    tokenizer) between the run's saved blueprint and ``bp``; refused unless ``allow``."""
    try:
        vocab = load_tokenizer(run / RunDir.TOKENIZER).vocab_size
    except DataError:
        vocab = None
    changes = architecture_changes(to_yaml(run_spec(saved, vocab).model), to_yaml(run_spec(bp, vocab).model))
    refuse_architecture_change(changes, run, allow)
    return changes


def read_source_blueprint(path: Path):
    """A fine-tuning source run's saved blueprint and its RunSpec."""
    bp = load_blueprint(path)
    return bp, run_spec(bp)


def prepare(bp, base_dir: Path, run=None, spec=None):
    """Prepared data and the run spec (the vocabulary comes from the tokenizer); ``spec``: the blueprint's
    RunSpec when the caller has built it already.

    A fine-tuning blueprint gets its task instead (data, the source run's tokenizer; ``run``: resuming)."""
    spec = spec or run_spec(bp)
    if spec.finetune is not None:
        return prepare_finetune(bp, spec, base_dir, read_source_blueprint, resume=run)
    if spec.data is None:
        raise BlueprintError([bp.problem(("data",), "a training run needs a 'data:' section (source and "
                                                    "tokenizer)")])
    prep = prepare_data(spec.data, base_dir=base_dir, progress=True)
    spec = spec.with_vocab(prep.tokenizer.vocab_size)
    check_fits(prep, spec.model.context_length, spec.model.vocab_size)
    return prep, spec


def dry_run(bp, base_dir: Path, spec, run=None) -> int:
    """Training's checks that need no prepared data (:func:`preflight`), then the plan; exit 2 after the plan when
    a check failed.  The data is not tokenized: it is used when already prepared (then its checks run too), and
    prepared only where the model's vocabulary comes from the corpus (``char`` with ``vocab_size: auto``)."""
    pf = preflight(spec, base_dir, name=bp.name, resume=run)
    if spec.finetune is not None:             # the source run and the records: read, nothing tokenized
        pf.raise_problems()
        task, spec = prepare(bp, base_dir, run, spec)
        data_checks(spec, task.tokenizer, base_dir)
        code = finetune_dry_run(bp, task, spec)
        print(pf.waiting_line())
        return code
    prep = None
    if spec.data is None and spec.model.vocab_size == "auto":
        prepare(bp, base_dir, run, spec)      # refuses: the vocabulary has nowhere to come from
    if spec.data is not None and not pf.problems:
        prep = find_prepared(spec.data, base_dir)
        if prep is None and spec.model.vocab_size == "auto" and tokenizer_vocab_size(spec.data) is None:
            print(f"the {spec.data.tokenizer.kind} tokenizer's vocabulary comes from the corpus: preparing the data",
                  file=sys.stderr)
            prep = prepare_data(spec.data, base_dir=base_dir, progress=True)
    if prep is not None:
        spec = spec.with_vocab(prep.tokenizer.vocab_size)
        try:
            check_fits(prep, spec.model.context_length, spec.model.vocab_size)
            data_checks(spec, prep.tokenizer, base_dir)
        except DataError as e:
            pf.problems.append(str(e))
        pf.waiting = []
    elif spec.data is not None:
        try:
            spec = spec.with_vocab(tokenizer_vocab_size(spec.data))
        except DataError as e:       # e.g. tiktoken's file not cached: a problem, but a fixed vocabulary still plans
            if spec.model.vocab_size == "auto":
                raise
            pf.problems.append(str(e))
    check = None
    if spec.model.vocab_size != "auto":
        check = print_plan(bp, prep, spec)
    print(pf.waiting_line())
    pf.raise_problems()
    if check is not None and check.fits is False:
        return fail(WontFit(f"the run does not fit in memory: {check.shortfall()}"), EXIT_WONT_FIT)
    return 0


def print_plan(bp, prep, spec):
    """The parameter table, the plan, the runtime plan and the memory plan; returns the memory check.

    All of it is arithmetic on the spec (``model.plan``): nothing is built, not even on the meta device, so an
    absurd size plans as fast as a small one and ends in "does not fit"."""
    report = param_report(spec.model)
    t = spec.train
    tokens_per_step = t.tokens_per_step(spec.model.context_length)
    print(report.table())
    if prep is not None:
        data = (f"{len(prep.train):,} train / {len(prep.val):,} val tokens ({prep.tokenizer.vocab_size:,}-token "
                "vocabulary)")
    elif spec.data is not None:
        data = (f"data not prepared yet ({spec.data.source.kind} source, {spec.data.tokenizer.kind} tokenizer, "
                f"{spec.model.vocab_size:,}-token model vocabulary)")
    else:
        data = "no data section: the architecture only (training needs one)"
    print(f"\nplan for '{bp.name}': {t.steps:,} steps x {tokens_per_step:,} tokens/step "
          f"({t.batch_size} x {spec.model.context_length} x {t.grad_accum} accum) = "
          f"{t.steps * tokens_per_step:,} tokens; {data}")
    print(f"optimizer {to_yaml(t.optimizer)}, lr {t.lr:g}, schedule {to_yaml(t.schedule)}")
    print(f"about {flops_per_token(spec.model) * t.steps * tokens_per_step:.3g} training FLOPs; "
          f"runs go to {spec.logging.runs_dir}/{bp.name}/<timestamp>/  (dry run: nothing trained)")
    try:
        print(describe_plan(spec.runtime))
        check = planned_check(spec.model, t, spec.runtime)
    except RuntimeSetupError as e:       # the profile itself is refused (preflight reports it)
        print(f"runtime: no plan: {e}")
        return None
    print(check.report())
    return check


def train(bp, run, base_dir: Path, saved: dict | None = None, checkpoint: str = "latest",
          architecture: list[str] = ()) -> int:
    """``architecture``: resuming, the model-section changes allowed by --allow-architecture-change.

    The run folder is locked (:class:`RunLock`) from when this process first changes it to the end: a second
    trainer of the same folder is refused."""
    with ExitStack() as held:
        return _train(bp, run, base_dir, saved, checkpoint, architecture, held)


def _train(bp, run, base_dir: Path, saved, checkpoint: str, architecture, held: ExitStack) -> int:
    spec = run_spec(bp)
    preflight(spec, base_dir, name=bp.name, resume=run).raise_problems()   # what shows before any data work
    runtime = setup_runtime(spec.runtime)
    if run is not None:              # resuming: before the data, the model or anything in the folder is touched
        held.enter_context(lock_for_training(run.path, runtime))
    planned = spec.model        # the memory plan before the data is prepared, with --dry-run's vocabulary:
    if spec.finetune is None and spec.data is not None and planned.vocab_size == "auto":   # byte, bpe, tiktoken
        try:
            planned = planned.with_vocab(tokenizer_vocab_size(spec.data))
        except DataError:       # e.g. tiktoken's file not cached: preparing the data says so, or finds it
            pass
    checked = spec.finetune is None and planned.vocab_size != "auto"
    if checked:
        refuse_if_too_big(planned, spec.train, runtime)
    prep, spec = prepare(bp, base_dir, run, spec)
    if spec.finetune is None and not checked:
        refuse_if_too_big(spec.model, spec.train, runtime)
    evals = data_checks(spec, prep.tokenizer, base_dir)   # the prompt and the eval files, against the tokenizer
    seed_everything(spec.train.seed)
    if spec.finetune is not None:  # weights from the source run; the task's batches and evaluation
        trainer = prep.make_trainer(spec, runtime)
    else:
        trainer = Trainer(runtime.prepare_model(build_model(spec.model, device=runtime.build_device,
                                                            seed=spec.train.seed)),
                          spec.train, runtime, prep, context_length=spec.model.context_length,
                          sampling=spec.data.sampling)
    resumed_from = None
    if run is None:
        if runtime.is_main:  # rank 0 creates the run folder and tells the others its name
            run = RunDir.create(spec.logging.runs_dir, bp.name, bp.to_yaml(),
                                {"blueprint": str(Path(bp.path).resolve()), "base_dir": str(base_dir),
                                 "argv": sys.argv[1:], "nanodecoder": __version__},
                                keep_checkpoints=spec.train.keep_checkpoints)
            held.enter_context(RunLock(run.path))
            prep.tokenizer.save(run / RunDir.TOKENIZER)
        run = RunDir(runtime.broadcast_text(str(run.path) if runtime.is_main else ""),
                     keep_checkpoints=spec.train.keep_checkpoints)
    else:
        run = RunDir(run.path, keep_checkpoints=spec.train.keep_checkpoints)
        resumed_from = resume_trainer(trainer, run, checkpoint)
        changed = [k for k in changed_keys(saved, bp.raw) if k.split(".")[0] != "model"]
        if changed and runtime.is_main:
            print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
        if architecture and runtime.is_main:
            print(f"note: resuming with a changed architecture ({ALLOW_ARCHITECTURE_CHANGE}): "
                  f"{'; '.join(architecture)}", file=sys.stderr)
        changed += [c.split(":")[0] for c in architecture]
        if changed and runtime.is_main:
            write_atomic_text(run / RunDir.BLUEPRINT, bp.to_yaml())     # a reader sees the old one or the new
            run.update_meta(changed_on_resume=run.meta().get("changed_on_resume", []) + changed)
    meta = run.meta()
    wandb_run = start_wandb(spec.logging.wandb, run.path, config=bp.raw, default_name=f"{bp.name}-{run.path.name}",
                            run_id=meta.get("wandb_id")) if runtime.is_main else None
    if wandb_run is not None and meta.get("wandb_id") != wandb_run.id:
        run.update_meta(wandb_id=wandb_run.id)
    result = run_training(trainer, run, logging=spec.logging, sample=spec.sample, name=bp.name,
                          params=count_params(trainer.raw_model), tokenizer=prep.tokenizer, wandb_run=wandb_run,
                          resumed_from=resumed_from, evals=evals,
                          train_tokens=prep.train_tokens if spec.finetune is not None else len(prep.train))
    exit_code = result.exit_code
    # The DDP / FSDP wrapper holds the process group and so gloo's worker threads: drop it first,
    # so that leaving the group stops them now instead of during the interpreter's teardown,
    # where a thread still holding tensors can abort the finished process (pytorch#179291).
    del trainer, result, evals
    runtime.close()   # leave the process group together (torchrun)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        args.overrides = [*args.overrides, f"runtime.profile={args.profile}"]
    try:
        bp, run, base_dir, saved = load(args)
        if args.print_config:
            print(bp.to_yaml(), end="")
            return 0
        architecture = [] if run is None else architecture_changes_on_resume(bp, saved, run,
                                                                               args.allow_architecture_change)
        if args.dry_run:
            return dry_run(bp, base_dir, run_spec(bp), run)
        return train(bp, run, base_dir, saved, args.checkpoint, architecture)
    except user_errors() as e:
        return fail(e, EXIT_USAGE)
    except WontFit as e:
        return fail(e, EXIT_WONT_FIT)
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up
        print("aborted (no checkpoint written for the current step)", file=sys.stderr)
        return 130
