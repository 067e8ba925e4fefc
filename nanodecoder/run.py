"""Train a model from a blueprint.

    python -m nanodecoder.run BLUEPRINT [--set key=value ...] [--dry-run] [--print-config]
    python -m nanodecoder.run [BLUEPRINT] --resume RUN_DIR [--set train.steps=4000]
    python -m nanodecoder.run BLUEPRINT --profile gpu_mixed [--set runtime.compile=true]
    torchrun --nproc_per_node=8 -m nanodecoder.run BLUEPRINT --profile multi_gpu_compile

A run writes ``<runs_dir>/<name>/<timestamp>/``: the resolved ``blueprint.yaml``,
``metrics.jsonl``, ``loss.png``, ``ckpt/``, ``samples.txt`` and the tokenizer.
Ctrl-C or SIGTERM saves a checkpoint and exits; ``--resume`` continues exactly from
the latest checkpoint, with the run's saved blueprint, or with BLUEPRINT when one
is given (changed keys are listed; a changed architecture is refused).
Errors in the blueprint, the data or a checkpoint print one message and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

EXIT_USAGE = 2


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m nanodecoder.run", description=__doc__.split("\n\n")[0])
    p.add_argument("blueprint", nargs="?",
                   help="a blueprint file, or the name of a shipped one (optional with --resume)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a blueprint value (dotted key), e.g. --set train.steps=100; repeatable")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--profile", choices=_profiles(), metavar="NAME",
                   help="runtime profile (overrides runtime.profile): " + ", ".join(_profiles()))
    p.add_argument("--dry-run", action="store_true",
                   help="validate, prepare the data, build the model on the meta device, print the plan; no training")
    p.add_argument("--print-config", action="store_true", help="print the resolved blueprint (YAML) and exit")
    args = p.parse_args(argv)
    if args.blueprint is None and args.resume is None:
        p.error("give a BLUEPRINT, or --resume RUN_DIR")
    return args


def _profiles() -> list[str]:
    from .runtime import AUTO, available_profiles
    return [AUTO, *available_profiles()]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: printed without a traceback, exit 2."""
    from .config import BlueprintError
    from .data import DataError
    from .registry import RegistryError
    from .runtime import RuntimeSetupError
    from .train.checkpoint import CheckpointError
    from .train.rundir import RunDirError
    from .train.trainer import StateMismatch
    from .train.wandb_log import WandbError
    return (BlueprintError, DataError, RegistryError, RuntimeSetupError, CheckpointError, RunDirError,
            StateMismatch, WandbError)


def load(args):
    """(blueprint, run dir or None, base folder of relative data paths)."""
    from .config import load_blueprint
    from .train.rundir import RunDir
    if args.resume is None:
        bp = load_blueprint(args.blueprint, args.overrides)
        return bp, None, Path(bp.path).resolve().parent
    run = RunDir.open(args.resume)
    meta = run.meta()
    if args.blueprint is not None:
        bp = load_blueprint(args.blueprint, args.overrides)
        base_dir = Path(bp.path).resolve().parent
    else:
        bp = load_blueprint(run / RunDir.BLUEPRINT, args.overrides)
        base_dir = Path(meta.get("base_dir", run.path))
    bp.name = meta.get("name", bp.name)
    return bp, run, base_dir


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved blueprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def prepare(bp, base_dir: Path, run=None):
    """Prepared data and the run spec (the vocabulary comes from the tokenizer).

    A fine-tuning blueprint gets its task instead (data, the source run's tokenizer; ``run``: resuming)."""
    from .config import BlueprintError, Problem
    from .config.spec import build_run_spec
    from .data import DataSpec, check_fits, prepare_data
    if "finetune" in bp.raw:
        from .finetune import prepare_finetune
        return prepare_finetune(bp, base_dir, resume=run)
    if "data" not in bp.raw:
        raise BlueprintError([Problem(str(bp.path), "data", None,
                                      "a training run needs a 'data:' section (source and tokenizer)")])
    prep = prepare_data(DataSpec.from_dict(bp.raw["data"]), base_dir=base_dir, progress=True)
    spec = build_run_spec(bp.raw, vocab_size=prep.tokenizer.vocab_size)
    check_fits(prep, spec.model.context_length, spec.model.vocab_size)
    return prep, spec


def check_prompt(tokenizer, prompt: str) -> None:
    """Refuse, before training, a final-sample prompt the tokenizer cannot encode."""
    from .data import DataError
    from .sample import encode_prompt
    try:
        encode_prompt(tokenizer, prompt)
    except (DataError, ValueError) as e:
        raise DataError(f"sample.prompt {prompt!r}: {e}") from None


def dry_run(bp, prep, spec) -> int:
    if spec.finetune is not None:
        from .finetune import dry_run as finetune_dry_run
        return finetune_dry_run(bp, prep, spec)
    from .model import build_model
    from .params import count_params, flops_per_token
    model = build_model(spec.model, device="meta")
    report = count_params(model)
    t = spec.train
    tokens_per_step = t.tokens_per_step(spec.model.context_length)
    print(report.table())
    print(f"\nplan for '{bp.name}': {t.steps:,} steps x {tokens_per_step:,} tokens/step "
          f"({t.batch_size} x {spec.model.context_length} x {t.grad_accum} accum) = "
          f"{t.steps * tokens_per_step:,} tokens; {len(prep.train):,} train / {len(prep.val):,} val tokens "
          f"({prep.tokenizer.vocab_size:,}-token vocabulary)")
    print(f"optimizer {t.optimizer.to_dict()}, lr {t.lr:g}, schedule {t.schedule.to_dict()}")
    print(f"about {flops_per_token(spec.model) * t.steps * tokens_per_step:.3g} training FLOPs; "
          f"runs go to {spec.logging.runs_dir}/{bp.name}/<timestamp>/  (dry run: nothing trained)")
    from .runtime import describe_plan
    print(describe_plan(spec.runtime))
    return 0


def train(bp, run, base_dir: Path) -> int:
    from . import __version__
    from .model import build_model
    from .params import count_params
    from .runtime import RuntimeSpec, setup_runtime
    from .train.loop import resume_trainer, run_training
    from .train.rundir import RunDir
    from .train.trainer import Trainer, seed_everything
    from .train.spec import LoggingSpec
    from .train.wandb_log import preflight, start_wandb
    preflight(LoggingSpec.from_dict(bp.raw.get("logging")).wandb)
    runtime = setup_runtime(RuntimeSpec.from_dict(bp.raw.get("runtime")))  # machine checks before any work
    prep, spec = prepare(bp, base_dir, run)
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
    from .eval import build_periodic_evals
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
        resumed_from = resume_trainer(trainer, run)
        saved = yaml.safe_load((run / RunDir.BLUEPRINT).read_text())
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
    from .cli_common import fail
    errors = user_errors()
    try:
        bp, run, base_dir = load(args)
        if args.print_config:
            print(bp.to_yaml(), end="")
            return 0
        if args.dry_run:
            return dry_run(bp, *prepare(bp, base_dir))
        return train(bp, run, base_dir)
    except errors as e:
        return fail(e, EXIT_USAGE)
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up
        print("aborted (no checkpoint written for the current step)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
