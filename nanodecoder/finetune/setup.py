"""From a blueprint with a ``finetune:`` section to the task and the run spec (the run's fine-tuning strategy,
``api/run.py``, calls this where a pre-training run prepares its token data)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import BlueprintError
from ..config.declare import to_yaml
from ..model import build_model
from ..model.params import count_params
from .source import SourceRun, check_against_source


def prepare_finetune(bp, spec, base_dir: Path, tokenizer, source: SourceRun | None = None):
    """``(task, RunSpec)``: the checks that the blueprint fits the source run, and the task with its data read and
    encoded.

    ``spec``: the blueprint's RunSpec, its vocabulary resolved with ``tokenizer`` (the source run's, or resuming
    the run's own copy of it); ``source``: the run it starts from, its spec read (``finetune.source.open_source``;
    None when resuming)."""
    ft = spec.finetune
    if source is not None:
        check_against_source(bp, spec, source)
    task_cls = ft.impl
    if not task_cls.generates_text and spec.eval is not None:
        raise BlueprintError([bp.problem(("eval",), f"a {ft.kind} model has no language-model head to evaluate "
                                                    "text with; remove the eval section")])
    if not task_cls.generates_text:
        spec = dataclasses.replace(spec, sample=dataclasses.replace(spec.sample, enabled=False))
    task = task_cls(ft, tokenizer=tokenizer, base_dir=base_dir, context_length=spec.model.context_length,
                    source=source)
    return task, spec


def dry_run(bp, task, spec) -> int:
    """Validate, read the data and the source run, print the parameter table and plan; train nothing."""
    print(count_params(build_model(spec.model, device="meta")).table())
    t = spec.train
    rows = t.batch_size * t.grad_accum
    print(f"\n{task.describe()}\nplan for '{bp.name}': {t.steps:,} steps x {rows} rows (up to "
          f"{spec.model.context_length} tokens each) = {t.steps * rows / len(task.train_units):.2f} epochs of "
          f"{len(task.train_units):,} rows; lr {t.lr:g}, schedule {to_yaml(t.schedule)}")
    print(f"runs go to {spec.logging.runs_dir}/{bp.name}/<timestamp>/  (dry run: nothing trained)")
    return 0
