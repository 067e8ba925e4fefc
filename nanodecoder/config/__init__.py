"""Blueprint loading and validation: YAML -> validated, resolved dict (+ line map)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..resources import resolve_blueprint
from .errors import BlueprintError, Problem
from .loader import apply_overrides, dotted, load_file
from .semantic import model_checks
from .validate import locate, schema_problems


@dataclass
class Blueprint:
    """A resolved, validated blueprint.  ``raw`` is what gets built and saved."""
    path: Path
    name: str
    raw: dict
    lines: dict = field(repr=False, default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=None)


def load_blueprint(path: str | Path, overrides: list[str] | None = None, *, validate: bool = True) -> Blueprint:
    """Load ``path`` (a file, or a shipped blueprint's name), apply ``extends`` and
    ``--set`` overrides, validate, and return the resolved Blueprint.

    Raises BlueprintError listing every problem found.
    """
    path = resolve_blueprint(path)
    raw, lines = load_file(Path(path))
    apply_overrides(raw, lines, list(overrides or []))
    shown = next(iter(lines.values()))[0] if lines else str(path)
    if validate:
        check(raw, lines, shown)
    name = raw.get("name") or Path(path).stem
    return Blueprint(path=Path(path), name=name, raw=raw, lines=lines)


def check(raw: dict, lines: dict, shown: str) -> None:
    problems = schema_problems(raw, lines, shown)
    if not problems:
        for p, message in model_checks(raw):
            file, line = locate(lines, p, shown)
            problems.append(Problem(file, dotted(p), line, message))
    if problems:
        raise BlueprintError(problems)


__all__ = ["Blueprint", "BlueprintError", "Problem", "load_blueprint"]
