"""From a blueprint with a ``finetune:`` section to the task and the run spec (``run.py`` calls this
where a pre-training run prepares its token data)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import BlueprintError, Problem
from ..config.loader import dotted, locate


def _problem(bp, path: tuple, message: str) -> Problem:
    file, line = locate(bp.lines, path, str(bp.path))
    return Problem(file, dotted(path), line, message)


def prepare_finetune(bp, base_dir: Path, resume=None):
    """``(task, RunSpec)``: the source run's tokenizer (or, resuming, the run's own copy of it), the
    checks that the blueprint fits the source run, and the task with its data read and encoded."""
    from ..config.spec import build_run_spec
    from ..data import load_tokenizer
    from ..registry import registries
    from ..train.rundir import RunDir
    from .source import check_against_source, open_source
    raw_ft = bp.raw["finetune"]
    task_cls = registries()["finetune"].get(raw_ft["kind"])
    source = None
    if resume is None:
        source = open_source(raw_ft["from"], base_dir, raw_ft.get("from_checkpoint", "best"))
        tokenizer = source.tokenizer
    else:
        tokenizer = load_tokenizer(Path(resume.path) / RunDir.TOKENIZER)
    spec = build_run_spec(bp.raw, vocab_size=tokenizer.vocab_size)
    if source is not None:
        check_against_source(bp, source, spec.model)
    problems = [_problem(bp, ("finetune",) + path, msg)
                for path, msg in task_cls.problems(spec.finetune.params, spec.model)]
    if not task_cls.generates_text and spec.eval is not None:
        problems.append(_problem(bp, ("eval",), f"a {raw_ft['kind']} model has no language-model head to "
                                                "evaluate text with; remove the eval section"))
    if problems:
        raise BlueprintError(problems)
    if not task_cls.generates_text:
        spec = dataclasses.replace(spec, sample=dataclasses.replace(spec.sample, enabled=False))
    task = task_cls(spec.finetune.params, tokenizer=tokenizer, base_dir=base_dir,
                    context_length=spec.model.context_length, source=source)
    return task, spec


def dry_run(bp, task, spec) -> int:
    """Validate, read the data and the source run, print the parameter table and plan; train nothing."""
    from ..model import build_model
    from ..params import count_params
    print(count_params(build_model(spec.model, device="meta")).table())
    t = spec.train
    rows = t.batch_size * t.grad_accum
    print(f"\n{task.describe()}\nplan for '{bp.name}': {t.steps:,} steps x {rows} rows (up to "
          f"{spec.model.context_length} tokens each) = {t.steps * rows / len(task.train_units):.2f} epochs of "
          f"{len(task.train_units):,} rows; lr {t.lr:g}, schedule {t.schedule.to_dict()}")
    print(f"runs go to {spec.logging.runs_dir}/{bp.name}/<timestamp>/  (dry run: nothing trained)")
    return 0
