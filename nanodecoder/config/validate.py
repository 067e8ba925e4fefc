"""Schema validation: every JSON Schema error of a raw blueprint, located and explained.

Follow-on noise is dropped before explaining: under a component block whose
``kind`` is unknown or missing, only that is reported (its parameters cannot be
checked without a kind); under a value of the wrong type, only the type.
"""
from __future__ import annotations

from ..registry import registries
from .errors import Problem
from .loader import LineMap, dotted, locate
from .messages import explain
from .schema import prepared


def _under(path: tuple, prefix: tuple) -> bool:
    return path[:len(prefix)] == prefix


def _roots(errors) -> list[tuple[tuple, object]]:
    """``(path, error)`` of the errors that make everything else under ``path`` noise."""
    roots = []
    for err in errors:
        path, inst = tuple(err.absolute_path), err.instance
        if err.validator == "enum" and "x-category" in err.schema:
            roots.append((path[:-1], err))                       # unknown kind
        elif err.validator == "required" and "kind" in err.validator_value \
                and isinstance(inst, dict) and "kind" not in inst:
            roots.append((path, err))                            # missing kind
        elif err.validator == "type":
            roots.append((path, err))                            # wrong type
    return roots


def without_follow_ons(errors: list) -> list:
    """Drop the errors that only repeat, below it, what a root error already says."""
    roots: dict[tuple, object] = {}
    for path, err in _roots(errors):
        roots.setdefault(path, err)                              # the first root error at a path speaks
    return [e for e in errors
            if not any(_under(tuple(e.absolute_path), p) and e is not r for p, r in roots.items())]


def schema_problems(raw: dict, lines: LineMap, default_file: str, registries_=None) -> list[tuple[tuple, Problem]]:
    """``(path, Problem)`` for every schema violation in ``raw``."""
    validator, files = prepared(registries_ if registries_ is not None else registries())
    out = []
    for err in without_follow_ons(list(validator.iter_errors(raw))):
        for path, message in explain(err, files):
            file, line = locate(lines, path, default_file)
            out.append((path, Problem(file, dotted(path), line, message)))
    return out
