"""Blueprint loading and validation: YAML -> validated, resolved dict (+ line map).

    bp = load_blueprint("blueprints/gpt2_124m.yaml", ["model.n_layers=4"])
    bp.raw        # the resolved blueprint (extends merged, --set applied)
    bp.lines      # key path tuple -> (file, line)
    bp.to_yaml()  # what gets saved with a run; loads back to the same raw

Every problem is collected and raised at once as a BlueprintError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..resources import resolve_blueprint
from .errors import BlueprintError, Problem, sort_problems
from .loader import LineMap, display, dotted, load_file, locate
from .overrides import apply_overrides
from .semantic import model_checks
from .validate import schema_problems


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
    path = Path(resolve_blueprint(path))
    raw, lines = load_file(path)
    problems = apply_overrides(raw, lines, list(overrides or []))
    shown = display(path)
    if validate:
        problems += check(raw, lines, shown)
    if problems:
        files = list(dict.fromkeys([shown] + [f for f, _ in lines.values()]))
        keys = [o.partition("=")[0].strip() or o for o in overrides or []]
        raise BlueprintError(sort_problems(problems, files, keys))
    name = raw.get("name") or path.stem
    return Blueprint(path=path, name=str(name), raw=raw, lines=lines)


def check(raw: dict, lines: LineMap, shown: str) -> list[Problem]:
    """Schema problems, then the semantic ones among the values that passed the schema."""
    found = schema_problems(raw, lines, shown)
    bad = [p for p, _ in found]
    problems = [problem for _, problem in found]

    def clean(path: tuple) -> bool:
        """No schema problem at or under ``path``."""
        return not any(p[:len(path)] == path for p in bad)

    if isinstance(raw.get("model"), dict):
        for p, message in model_checks(raw, clean):
            file, line = locate(lines, p, shown)
            problems.append(Problem(file, dotted(p), line, message))
    return problems


__all__ = ["Blueprint", "BlueprintError", "Problem", "load_blueprint"]
