"""Validation: every JSON Schema error of a raw blueprint, then every declared cross-field check.

Follow-on noise is dropped before explaining: under a component block whose
``kind`` is unknown or missing, only that is reported (its parameters cannot be
checked without a kind); under a value of the wrong type, only the type.  The
cross-field checks (``check()`` of each declared class, see ``declare.py``) run
on the parts that passed the schema, so one mistake is never reported twice
and the others are still all found.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

from .declare import checks, context_problems
from .errors import Problem
from .loader import LineMap, dotted, locate
from .messages import explain
from .registry import CATEGORIES, Catalog, RegistryError, signature
from .schema import compile_schema, document


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


def schema_of(root, catalog: Catalog) -> dict:
    """The JSON Schema document generated for the declared class ``root`` and the catalog's kinds; a kind whose
    :func:`~.declare.context` names no enclosing field is a :class:`RegistryError` here, before any use."""
    problems = context_problems(root, catalog)
    if problems:
        raise RegistryError("a registered kind takes a value no section hands down: " + "; ".join(problems))
    return document(root, catalog, CATEGORIES, getattr(root, "SCHEMA_TITLE", root.__name__))


_CACHE: dict[tuple, tuple] = {}


def validator_for(root, catalog: Catalog):
    """``(validator, prepared files)``, cached per root class and set of registered kinds."""
    key = (root, signature(catalog))
    if key not in _CACHE:
        _CACHE[key] = compile_schema(schema_of(root, catalog), f"{root.__name__}.schema.json")
    return _CACHE[key]


INT_RANGE = (-2 ** 63, 2 ** 63 - 1)    # what torch, numpy and the checkpoint formats can hold


def unusable_numbers(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """``(path, message)`` of every NaN or infinite float and every integer beyond 64 bits: JSON Schema lets
    NaN through ``minimum``/``maximum`` and any integer through ``integer``, and no setting can use them."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from unusable_numbers(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from unusable_numbers(v, path + (i,))
    elif isinstance(value, float) and not math.isfinite(value):
        word = ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        yield path, f"{word} is not a usable number here; give a finite value"
    elif isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        yield path, (f"the integer {value} is out of range; integers must lie within +-{INT_RANGE[1]:,} "
                     "(64 bits)")


def problems(raw, lines: LineMap, shown: str, root, catalog: Catalog) -> list[Problem]:
    """Schema problems, then the cross-field ones among the values that passed the schema."""
    validator, files = validator_for(root, catalog)
    out: list[Problem] = []
    bad: list[tuple] = []
    for path, message in unusable_numbers(raw):
        bad.append(path)
        file, line = locate(lines, path, shown)
        out.append(Problem(file, dotted(path), line, message))
    for err in without_follow_ons(list(validator.iter_errors(raw))):
        if tuple(err.absolute_path) in bad:
            continue                  # said above
        for path, message in explain(err, files):
            bad.append(path)
            file, line = locate(lines, path, shown)
            out.append(Problem(file, dotted(path), line, message))

    def clean(path: tuple) -> bool:
        """No schema problem at or under ``path``."""
        return not any(p[:len(path)] == path for p in bad)

    for path, message in checks(root, raw, (), catalog, clean):
        file, line = locate(lines, path, shown)
        out.append(Problem(file, dotted(path), line, message))
    return out


