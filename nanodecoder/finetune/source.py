"""The run a fine-tuning starts from: its blueprint, tokenizer and checkpoint, and the checks
that the fine-tuning blueprint describes the same model and tokenizer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BlueprintError, dotted
from ..config.declare import to_yaml
from ..data import load_tokenizer
from ..train.rundir import RunDir, RunDirError
from ..config.loader import blueprint_path

@dataclass
class SourceRun:
    run: RunDir
    spec: Any            # the source run's RunSpec, its vocabulary resolved (set by the caller, which reads blueprints)
    tokenizer: object
    checkpoint: Path
    which: str = "latest"     # what the blueprint asked for (the source may still be training: re-resolved)

    def load_weights(self, model) -> None:
        self.checkpoint = self.run.checkpoints.read_weights(model, self.which, self.checkpoint)


def _newest_run(folder: Path) -> Path | None:
    """The newest run directory (by timestamp name) with a complete checkpoint under ``folder``."""
    def order(p: Path) -> tuple:  # "20250102-030405" < "20250102-030405-2" < "20250102-030405-10"
        parts = p.name.split("-")
        return (parts[:2], int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 1)

    runs = sorted((p.parent for p in folder.glob("*/" + RunDir.BLUEPRINT)), key=order)
    for path in reversed(runs):
        if RunDir(path).checkpoints.latest() is not None:
            return path
    return None


def open_source(raw_path: str, base_dir: Path, which: str) -> SourceRun:
    """A run directory, or a folder of runs (``runs/dense_gpt``: the newest with a checkpoint); the caller sets
    its ``spec`` from ``run / RunDir.BLUEPRINT`` (the api layer reads blueprints: no callback down here)."""
    path = blueprint_path(raw_path, base_dir)
    if not (path / RunDir.BLUEPRINT).is_file() and path.is_dir():
        path = _newest_run(path) or path
    if not (path / RunDir.BLUEPRINT).is_file():
        raise RunDirError(f"finetune.from: {path} is not a run directory (no {RunDir.BLUEPRINT}) nor a folder "
                          "of runs with a checkpoint; train the source model first (python -m nanodecoder.run ...) "
                          "and point 'from' at its run directory (relative paths start at the blueprint's folder)")
    run = RunDir.open(path)
    checkpoint = run.checkpoints.for_reading(which)    # best: latest where the run has none
    tokenizer = load_tokenizer(run / RunDir.TOKENIZER)
    return SourceRun(run, None, tokenizer, checkpoint, which)


def diff(a, b, prefix: tuple = ()) -> list[tuple]:
    """Key paths whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str) for p in diff(a.get(k), b.get(k), prefix + (k,))]
    return [] if a == b else [prefix]


def _at(tree: dict, path: tuple):
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_against_source(bp, spec, source: SourceRun) -> None:
    """Refuse a blueprint whose model or tokenizer is not the source run's (dropout may change)."""
    problems = []
    mine, theirs = (dataclasses.replace(s.model, dropout=0.0) for s in (spec, source.spec))
    if mine != theirs:
        here, there = {"model": to_yaml(mine)}, {"model": to_yaml(theirs)}
        detail = "; ".join(f"{dotted(p)} is {_at(here, p)!r} here, {_at(there, p)!r} there"
                           for p in diff(here, there)[:4]) or "the resolved architectures differ"
        problems.append(bp.problem(("model",), f"fine-tuning starts from the weights of {source.run}, so the model "
                                               f"must be that run's model (only dropout may change): {detail}; copy "
                                               "the source blueprint's model section (or extend the source "
                                               "blueprint)"))
    if spec.data is not None and source.spec.data is not None \
            and to_yaml(spec.data.tokenizer) != to_yaml(source.spec.data.tokenizer):
        problems.append(bp.problem(("data", "tokenizer"), f"fine-tuning uses the tokenizer of {source.run} "
                                                          f"({to_yaml(source.spec.data.tokenizer)}), this blueprint "
                                                          f"names {to_yaml(spec.data.tokenizer)}; the vocabularies "
                                                          "must match: remove data.tokenizer or make it the source "
                                                          "run's"))
    if problems:
        raise BlueprintError(problems)
