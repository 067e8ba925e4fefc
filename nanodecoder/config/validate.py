"""Validation: JSON Schema first (every error, each explained), then semantic checks.

Messages follow ``file: dotted.path (line N): what is wrong; what is expected``.
We never print ``str(ValidationError)``: it dumps the schema.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from ..registry import registries, suggest
from .errors import Problem
from .loader import Location, dotted
from .schema import build_validator

_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "a mapping (key: value lines)", "array": "a list", "null": "null"}
_NUMBERISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _yaml_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return f"the string '{v}'"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def locate(lines: dict[tuple, Location], path: tuple, default_file: str) -> Location:
    """The (file, line) of ``path`` or of its closest ancestor that has one."""
    p = tuple(path)
    while True:
        if p in lines:
            return lines[p]
        if not p:
            return (default_file, None)
        p = p[:-1]


def _type_hint(expected: list[str], value: Any) -> str:
    if isinstance(value, str) and _NUMBERISH.match(value.strip()) and {"number", "integer"} & set(expected):
        mant, _, exp = value.strip().lower().partition("e")
        fixed = mant + ("" if "." in mant else ".0")
        if exp:
            fixed += "e" + (exp if exp[0] in "+-" else "+" + exp)
        return (f"; YAML reads {value} as a string (a YAML float needs a dot and a signed exponent), "
                f"write {fixed}")
    if isinstance(value, bool) and "string" in expected:
        return "; YAML reads yes/no/on/off/true/false as booleans, put the value in quotes"
    return ""


def schema_problems(raw: dict, lines: dict, default_file: str, registries_=None) -> list[Problem]:
    validator = build_validator(registries_ if registries_ is not None else registries())
    problems: list[Problem] = []
    for err in validator.iter_errors(raw):
        problems.extend(_explain(err, lines, default_file))
    # several branches can report the same thing; keep the first of each
    seen, unique = set(), []
    for p in problems:
        key = (p.path, p.message)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return sorted(unique, key=lambda p: (p.file, p.line or 0))


def _explain(err, lines, default_file) -> Iterable[Problem]:
    path = tuple(err.absolute_path)
    kind, value, inst, schema = err.validator, err.validator_value, err.instance, err.schema

    def at(p: tuple, message: str) -> Problem:
        file, line = locate(lines, p, default_file)
        return Problem(file, dotted(p), line, message)

    if kind == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(schema.get("properties", {}))
        for key in inst:
            if key not in allowed:
                yield at(path + (key,), f"unknown key '{key}'{suggest(key, allowed)} "
                                        f"(allowed here: {', '.join(allowed)})")
    elif kind == "required" and isinstance(inst, dict):
        props = schema.get("properties", {})
        for key in value:
            if key not in inst:
                desc = props.get(key, {}).get("description", "")
                yield at(path, f"missing required key '{key}'" + (f"; expected {desc[0].lower()}{desc[1:]}"
                                                                  if desc else ""))
    elif kind == "type":
        expected = value if isinstance(value, list) else [value]
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected)
        yield at(path, f"expected {names}, got {_yaml_type(inst)}{_type_hint(expected, inst)}")
    elif kind == "enum":
        choices = [str(c) for c in value]
        what = "kind" if path and path[-1] == "kind" else "value"
        yield at(path, f"unknown {what} '{inst}'{suggest(inst, choices)} (expected one of: {', '.join(choices)})")
    elif kind == "const":
        yield at(path, f"expected {value!r}, got {_yaml_type(inst)}")
    elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        yield at(path, f"{inst} is out of range; expected a value {op} {value}")
    elif kind in ("minItems", "maxItems", "uniqueItems", "minLength", "pattern", "multipleOf"):
        yield at(path, err.message)
    else:
        yield at(path, err.message if len(err.message) < 200 else f"invalid value ({kind} check failed)")
