"""The config core: declarations, YAML loading, validation and messages (imports nothing above it).

    bp = load_blueprint("blueprints/gpt2_124m.yaml", ["model.n_layers=4"], root=RunSpec, catalog=catalog)
    bp.raw        # the resolved blueprint (extends merged, --set applied)
    bp.lines      # key path tuple -> (file, line)
    bp.to_yaml()  # what gets saved with a run; loads back to the same raw

``root`` is the declared class of the whole file and ``catalog`` the registered
kinds (the layer above everything passes both, ``nanodecoder/api/blueprint.py``).
Every problem is collected and raised at once as a BlueprintError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..resources import resolve_blueprint
from .declare import build
from .errors import BlueprintError, Problem, sort_problems
from .loader import LineMap, display, dotted, load_file, locate, parse_yaml
from .overrides import apply_overrides
from .registry import Catalog, RegistryError, suggest
from .validate import problems


@dataclass
class Blueprint:
    """A resolved, validated blueprint.  ``raw`` is what gets built and saved."""
    path: Path
    name: str
    raw: dict
    lines: dict = field(repr=False, default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=None)

    def problem(self, path: tuple, message: str) -> Problem:
        """A problem located at ``path`` of this blueprint (its file and line)."""
        file, line = locate(self.lines, path, str(self.path))
        return Problem(file, dotted(path), line, message)


def load_blueprint(path: str | Path, overrides: list[str] | None = None, *, root, catalog: Catalog,
                   validate: bool = True) -> Blueprint:
    """Load ``path`` (a file, or a shipped blueprint's name), apply ``extends`` and
    ``--set`` overrides, validate against ``root`` and return the resolved Blueprint.

    Raises BlueprintError listing every problem found.
    """
    path = Path(resolve_blueprint(path))
    raw, lines = load_file(path)
    found = apply_overrides(raw, lines, list(overrides or []))
    shown = display(path)
    if validate:
        found += problems(raw, lines, shown, root, catalog)
    if found:
        files = list(dict.fromkeys([shown] + [f for f, _ in lines.values()]))
        keys = [o.partition("=")[0].strip() or o for o in overrides or []]
        raise BlueprintError(sort_problems(found, files, keys))
    name = raw.get("name") or path.stem
    return Blueprint(path=path, name=str(name), raw=raw, lines=lines)


def load_declared(path: Path, root, catalog: Catalog | None = None) -> tuple[Any, dict]:
    """``(built object, raw)`` of a YAML file whose whole content is the declared class ``root``
    (e.g. a runtime profile), validated with the blueprint's reader, checks and messages."""
    shown = display(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BlueprintError([Problem(shown, "", None, f"cannot read the file: {e}")]) from None
    raw, lines = parse_yaml(text, shown)
    found = problems(raw, lines, shown, root, catalog or {})
    if found:
        raise BlueprintError(sort_problems(found, [shown]))
    return build(root, raw, catalog), raw


__all__ = ["Blueprint", "BlueprintError", "Catalog", "LineMap", "Problem", "RegistryError", "build", "dotted",
           "load_blueprint", "load_declared", "locate", "suggest"]
