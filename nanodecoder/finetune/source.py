"""The run a fine-tuning starts from: its blueprint, tokenizer and checkpoint, and the checks
that the fine-tuning blueprint describes the same model and tokenizer."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import BlueprintError, Problem, load_blueprint
from ..config.loader import dotted, locate
from ..train.rundir import RunDir, RunDirError


@dataclass
class SourceRun:
    run: RunDir
    raw: dict            # the source run's resolved blueprint
    tokenizer: object
    checkpoint: Path

    def load_weights(self, model) -> None:
        from ..train.checkpoint import load_model_weights
        load_model_weights(model, self.checkpoint)


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


def open_source(raw_path: str, base_dir: Path, which: str = "best") -> SourceRun:
    """A run directory, or a folder of runs (``runs/dense_gpt``: the newest with a checkpoint)."""
    from ..data import load_tokenizer
    path = Path(raw_path) if os.path.isabs(raw_path) else Path(base_dir) / raw_path
    if not (path / RunDir.BLUEPRINT).is_file() and path.is_dir():
        path = _newest_run(path) or path
    if not (path / RunDir.BLUEPRINT).is_file():
        raise RunDirError(f"finetune.from: {path} is not a run directory (no {RunDir.BLUEPRINT}) nor a folder "
                          "of runs with a checkpoint; train the source model first (python -m nanodecoder.run ...) "
                          "and point 'from' at its run directory (relative paths start at the blueprint's folder)")
    run = RunDir.open(path)
    if which == "best" and run.checkpoints.best() is None:
        which = "latest"
    checkpoint = run.checkpoints.resolve(which)
    raw = load_blueprint(run / RunDir.BLUEPRINT).raw
    return SourceRun(run, raw, load_tokenizer(run / RunDir.TOKENIZER), checkpoint)


def diff(a, b, prefix: tuple = ()) -> list[tuple]:
    """Key paths whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str) for p in diff(a.get(k), b.get(k), prefix + (k,))]
    return [] if a == b else [prefix]


def check_against_source(bp, source: SourceRun, model_spec) -> None:
    """Refuse a blueprint whose model or tokenizer is not the source run's (dropout may change)."""
    from ..model import build_model_spec
    problems = []
    src_spec = build_model_spec(source.raw["model"], source.tokenizer.vocab_size)
    if dataclasses.replace(src_spec, dropout=0.0) != dataclasses.replace(model_spec, dropout=0.0):
        paths = [p for p in diff(bp.raw["model"], source.raw["model"], ("model",)) if p != ("model", "dropout")]
        detail = "; ".join(f"{dotted(p)} is {_get(bp.raw, p)!r} here, {_get(source.raw, p)!r} there"
                           for p in paths[:4]) or "the resolved architectures differ"
        file, line = locate(bp.lines, ("model",), str(bp.path))
        problems.append(Problem(file, "model", line,
                                f"fine-tuning starts from the weights of {source.run}, so the model must be that "
                                f"run's model (only dropout may change): {detail}; copy the source blueprint's "
                                "model section (or extend the source blueprint)"))
    mine, theirs = (bp.raw.get("data") or {}).get("tokenizer"), (source.raw.get("data") or {}).get("tokenizer")
    if mine is not None and mine != theirs:
        file, line = locate(bp.lines, ("data", "tokenizer"), str(bp.path))
        problems.append(Problem(file, "data.tokenizer", line,
                                f"fine-tuning uses the tokenizer of {source.run} ({theirs}), this blueprint names "
                                f"{mine}; the vocabularies must match: remove data.tokenizer or make it the "
                                "source run's"))
    if problems:
        raise BlueprintError(problems)


def _get(raw: dict, path: tuple):
    for key in path:
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw
