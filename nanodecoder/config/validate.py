"""Validation: every JSON Schema error of a raw blueprint, then every declared cross-field check.

Follow-on noise is dropped before explaining: under a component block whose
``kind`` is unknown or missing, only that is reported (its parameters cannot be
checked without a kind); under a value of the wrong type, only the type.  The
cross-field checks (``check()`` of each declared class, see ``declare.py``) run
on the parts that passed the schema, so one mistake is never reported twice
and the others are still all found.
"""
from __future__ import annotations



from .declare import checks
from .errors import Problem
from .loader import LineMap, dotted, locate
from .messages import explain
from .registry import CATEGORIES, Catalog, signature
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
    """The JSON Schema document generated for the declared class ``root`` and the catalog's kinds."""
    return document(root, catalog, CATEGORIES, getattr(root, "SCHEMA_TITLE", root.__name__))


_CACHE: dict[tuple, tuple] = {}


def validator_for(root, catalog: Catalog):
    """``(validator, prepared files)``, cached per root class and set of registered kinds."""
    key = (root, signature(catalog))
    if key not in _CACHE:
        _CACHE[key] = compile_schema(schema_of(root, catalog), f"{root.__name__}.schema.json")
    return _CACHE[key]


def problems(raw, lines: LineMap, shown: str, root, catalog: Catalog) -> list[Problem]:
    """Schema problems, then the cross-field ones among the values that passed the schema."""
    validator, files = validator_for(root, catalog)
    bad: list[tuple] = []
    out: list[Problem] = []
    for err in without_follow_ons(list(validator.iter_errors(raw))):
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


