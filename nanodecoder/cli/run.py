"""Train a model from a blueprint.

    python -m nanodecoder.run BLUEPRINT [--set key=value ...] [--dry-run] [--print-config]
    python -m nanodecoder.run [BLUEPRINT] --resume RUN_DIR [--checkpoint step_000040] [--set train.steps=4000]
    python -m nanodecoder.run BLUEPRINT --profile gpu_mixed [--set runtime.compile=true]
    torchrun --nproc_per_node=8 -m nanodecoder.run BLUEPRINT --profile multi_gpu_compile

A run writes ``<runs_dir>/<name>/<timestamp>/``: the resolved ``blueprint.yaml``,
``metrics.jsonl``, ``loss.png``, ``ckpt/``, ``samples.txt`` and the tokenizer.
Ctrl-C or SIGTERM saves a checkpoint and exits; ``--resume`` continues exactly from
the latest checkpoint, with the run's saved blueprint, or with BLUEPRINT when one
is given (changed keys are listed; a changed architecture is refused).

``--dry-run`` validates, builds nothing real and prints the parameter table, the
plan and the memory plan per process for the chosen profile (with and without
activation checkpointing) against the memory available here; a blueprint with
``model.vocab_size`` and no data section is planned offline.  Training checks the
same plan before it builds the weights (``runtime.check_memory: false`` skips it).

Exit codes: 0 done; 2 an error in the blueprint, the data, a checkpoint or a
profile this machine cannot run (one message, no traceback); 3 training stopped
at a non-finite loss; 4 the run does not fit in memory (``--dry-run`` prints the
whole plan and what does not fit; training refuses before building anything);
128 + N after signal N (a checkpoint was saved); 130 Ctrl-C during set-up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from .. import __version__
from ..config.declare import to_yaml
from ..data import DataError, check_fits, prepare_data
from ..eval import build_periodic_evals
from ..finetune import dry_run as finetune_dry_run
from ..finetune import prepare_finetune
from ..model import build_model
from ..model.generate import encode_prompt
from ..model.params import count_params
from ..model.plan import flops_per_token
from ..runtime import AUTO, available_profiles, describe_plan, setup_runtime
from ..train.loop import resume_trainer, run_training
from ..train.memory import WontFit, planned_check, refuse_if_too_big
from ..train.rundir import RunDir
from ..train.trainer import Trainer, seed_everything
from ..train.wandb_log import preflight, start_wandb
from ..config import Blueprint, BlueprintError
from .blueprint import load_blueprint, run_spec
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
    p.add_argument("--profile", choices=_profiles(), metavar="NAME",
                   help="runtime profile (overrides runtime.profile): " + ", ".join(_profiles()))
    p.add_argument("--dry-run", action="store_true",
                   help="validate, prepare the data, build the model on the meta device, print the plan and the "
                        "memory plan (exit 4 when it does not fit); no training")
    p.add_argument("--print-config", action="store_true", help="print the resolved blueprint (YAML) and exit")
    args = p.parse_args(argv)
    if args.checkpoint != "latest" and args.resume is None:
        p.error("--checkpoint needs --resume RUN_DIR")
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


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved blueprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


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


def check_prompt(tokenizer, prompt: str) -> None:
    """Refuse, before training, a final-sample prompt the tokenizer cannot encode."""
    try:
        encode_prompt(tokenizer, prompt)
    except (DataError, ValueError) as e:
        raise DataError(f"sample.prompt {prompt!r}: {e}") from None


def dry_run(bp, prep, spec) -> int:
    if spec.finetune is not None:
        return finetune_dry_run(bp, prep, spec)
    model = build_model(spec.model, device="meta")
    report = count_params(model)
    t = spec.train
    tokens_per_step = t.tokens_per_step(spec.model.context_length)
    print(report.table())
    data = (f"{len(prep.train):,} train / {len(prep.val):,} val tokens ({prep.tokenizer.vocab_size:,}-token "
            "vocabulary)" if prep is not None else "no data section: the architecture only (training needs one)")
    print(f"\nplan for '{bp.name}': {t.steps:,} steps x {tokens_per_step:,} tokens/step "
          f"({t.batch_size} x {spec.model.context_length} x {t.grad_accum} accum) = "
          f"{t.steps * tokens_per_step:,} tokens; {data}")
    print(f"optimizer {to_yaml(t.optimizer)}, lr {t.lr:g}, schedule {to_yaml(t.schedule)}")
    print(f"about {flops_per_token(spec.model) * t.steps * tokens_per_step:.3g} training FLOPs; "
          f"runs go to {spec.logging.runs_dir}/{bp.name}/<timestamp>/  (dry run: nothing trained)")
    print(describe_plan(spec.runtime))
    check = planned_check(spec.model, t, spec.runtime)
    print(check.report())
    if check.fits is False:
        return fail(WontFit(f"the run does not fit in memory: {check.shortfall()}"), EXIT_WONT_FIT)
    return 0


def train(bp, run, base_dir: Path, saved: dict | None = None, checkpoint: str = "latest") -> int:
    spec = run_spec(bp)
    preflight(spec.logging.wandb)
    runtime = setup_runtime(spec.runtime)  # machine checks before any work
    checked = spec.finetune is None and spec.model.vocab_size != "auto"
    if checked:                            # the memory plan before the data is prepared
        refuse_if_too_big(spec.model, spec.train, runtime)
    prep, spec = prepare(bp, base_dir, run, spec)
    if spec.finetune is None and not checked:
        refuse_if_too_big(spec.model, spec.train, runtime)
    if spec.sample.enabled:
        check_prompt(prep.tokenizer, spec.sample.prompt)
    seed_everything(spec.train.seed)
    if spec.finetune is not None:  # weights from the source run; the task's batches and evaluation
        trainer = prep.make_trainer(spec, runtime)
    else:
        trainer = Trainer(runtime.prepare_model(build_model(spec.model, device=runtime.build_device,
                                                            seed=spec.train.seed)),
                          spec.train, runtime, prep, context_length=spec.model.context_length,
                          sampling=spec.data.sampling)
    evals = build_periodic_evals(spec.eval, prep.tokenizer, base_dir)
    resumed_from = None
    if run is None:
        if runtime.is_main:  # rank 0 creates the run folder and tells the others its name
            run = RunDir.create(spec.logging.runs_dir, bp.name, bp.to_yaml(),
                                {"blueprint": str(Path(bp.path).resolve()), "base_dir": str(base_dir),
                                 "argv": sys.argv[1:], "nanodecoder": __version__},
                                keep_checkpoints=spec.train.keep_checkpoints)
            prep.tokenizer.save(run / RunDir.TOKENIZER)
        run = RunDir(runtime.broadcast_text(str(run.path) if runtime.is_main else ""),
                     keep_checkpoints=spec.train.keep_checkpoints)
    else:
        run = RunDir(run.path, keep_checkpoints=spec.train.keep_checkpoints)
        resumed_from = resume_trainer(trainer, run, checkpoint)
        changed = changed_keys(saved, bp.raw)
        if changed and runtime.is_main:
            print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
            (run / RunDir.BLUEPRINT).write_text(bp.to_yaml())
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
        if args.dry_run:
            spec = run_spec(bp)
            if spec.data is None and spec.finetune is None and spec.model.vocab_size != "auto":
                return dry_run(bp, None, spec)         # an architecture without data: planned offline
            return dry_run(bp, *prepare(bp, base_dir, spec=spec))
        return train(bp, run, base_dir, saved, args.checkpoint)
    except user_errors() as e:
        return fail(e, EXIT_USAGE)
    except WontFit as e:
        return fail(e, EXIT_WONT_FIT)
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up
        print("aborted (no checkpoint written for the current step)", file=sys.stderr)
        return 130
