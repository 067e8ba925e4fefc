"""One JSON Schema error -> short ``what is wrong; what is expected`` messages with hints.

Never ``str(ValidationError)`` (it dumps the schema) and never a Python repr:
values are shown the way YAML writes them, long strings are cut.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from jsonschema.exceptions import best_match

from .registry import suggest
from .schema import target

_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "a mapping (key: value lines)", "array": "a list", "null": "null"}
_NUMBERISH = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_LITERALS = re.compile(r"^\^\(?([\w-]+(?:\|[\w-]+)*)\)?\$$")
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}
BOOL_HINT = "YAML reads unquoted yes/no/on/off/true/false as booleans; put the value in quotes"


def show(v: Any) -> str:
    """A value as a user would write it in YAML (short)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return f"'{v}'" if len(v) <= 40 else f"'{v[:37]}...'"
    return "a mapping" if isinstance(v, dict) else "a list" if isinstance(v, list) else type(v).__name__


def describe(v: Any) -> str:
    """``the string '1e-4'``, ``the integer 3``, ``a list``, ..."""
    if v is None:
        return "null (an empty value)"
    kind = ("boolean" if isinstance(v, bool) else "integer" if isinstance(v, int) else
            "number" if isinstance(v, float) else "string" if isinstance(v, str) else None)
    return f"the {kind} {show(v)}" if kind else show(v)


def _desc(schema: dict) -> str:
    """A schema's description to follow "expected": no final dot, first word in lower case
    unless it is an acronym or a name (``RoPE``, ``AdamW``)."""
    d = schema.get("description", "").strip().rstrip(".")
    if d and schema.get("default") not in (None, "") and not isinstance(schema["default"], (dict, list)):
        d += f" (default {show(schema['default'])})"
    word = d.split(" ", 1)[0]
    return d[0].lower() + d[1:] if word and (len(word) == 1 or word[1:].islower()) else d


def _component(schema: dict) -> str:
    """`` for mlp kind 'gelu'`` inside a component's parameter schema, else ``""``."""
    comp = schema.get("x-component", "")
    category, _, kind = comp.partition(".")
    return f" for {category} kind '{kind}'" if comp else ""


def _number_hint(text: str, expected: set[str]) -> str:
    mant, _, exp = text.strip().lower().partition("e")
    if not exp and "number" in expected:
        return "; remove the quotes"          # unquoted, YAML would have read it as a number
    if "number" not in expected:
        value = float(text)
        return f"; write {int(value)}" if value.is_integer() else "; use a whole number"
    fixed = mant + ("" if "." in mant else ".0")
    if exp:
        fixed += "e" + (exp if exp[0] in "+-" else "+" + exp)
    return f"; YAML reads {text} as a string (a YAML float needs a dot and a signed exponent), write {fixed}"


def type_hint(expected: set[str], value: Any, schema: dict) -> str:
    """How to fix the commonest wrong-type mistakes (YAML traps first)."""
    if isinstance(value, str) and _NUMBERISH.match(value.strip()) and expected & {"number", "integer"}:
        return _number_hint(value, expected)
    if isinstance(value, float) and "integer" in expected and "number" not in expected:
        return f"; write {int(value)}" if value.is_integer() else "; use a whole number"
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS and "boolean" in expected:
        return "; remove the quotes and write true or false"
    if isinstance(value, bool) and "string" in expected:
        return f"; {BOOL_HINT}"
    if "object" in expected:
        if value is None:
            return "; the section is empty: indent its keys under it, or remove it"
        if isinstance(value, str) and "kind" in schema.get("properties", {}):
            return f"; write {{kind: {value}}}"
        if isinstance(value, list) and "array" not in expected:
            return "; remove the '- ' in front of its keys"
    if isinstance(value, list) and len(value) == 1 and not expected & {"array", "object"}:
        return "; remove the brackets"
    if "array" in expected:
        if isinstance(value, dict):
            return "; write one item per line, each starting with '- '"
        items = schema.get("items", {})
        if isinstance(value, (int, str)) and not isinstance(value, bool) and value in items.get("enum", [value]):
            return f"; write [{value}]"
    if "string" in expected and isinstance(value, (int, float)):
        return "; put the value in quotes"
    return ""


def _unknown_keys(err, files: dict) -> Iterator[tuple[tuple, str]]:
    schema, inst, path = err.schema, err.instance, tuple(err.absolute_path)
    allowed = sorted(schema.get("properties", {}))
    for key in inst:
        if key in allowed:
            continue
        # a key that exists, by its exact name, one level down is misindented,
        # which says more than a spelling guess ('mlp' is not a typo of 'mtp')
        homes = [p for p, sub in schema.get("properties", {}).items()
                 if isinstance(key, str) and key in target(files, sub).get("properties", {})]
        if homes:
            hint = f"; '{key}' belongs inside {' or '.join(repr(h) for h in homes)}, check its indentation"
        else:
            hint = suggest(key, allowed)
        if isinstance(key, bool) or key is None:
            hint += f"; {BOOL_HINT.replace('the value', 'the key')}"
        name = key if isinstance(key, str) else show(key)
        yield path + (key,), (f"unknown key '{name}'{_component(schema)}{hint} "
                              f"(allowed here: {', '.join(allowed)})")


def _missing(err, files: dict) -> Iterator[tuple[tuple, str]]:
    schema, inst, path = err.schema, err.instance, tuple(err.absolute_path)
    props = schema.get("properties", {})
    strays = [k for k in inst if isinstance(k, str) and k not in props]
    for key in err.validator_value:
        if key in inst:
            continue
        typo = [k for k in strays if suggest(k, [key])]
        if typo and schema.get("additionalProperties") is False:
            continue                    # the unknown-key message already says "did you mean"
        sub = props.get(key, {})
        kinds = target(files, sub).get("properties", {}).get("kind", {}).get("enum")
        expected = (f"one of: {', '.join(map(str, sub['enum']))}" if key == "kind" and "enum" in sub
                    else _desc(sub) or _desc(target(files, sub)))
        if kinds:
            expected += f": {{kind: {'|'.join(map(str, kinds))}, ...}}"
        message = f"missing required key '{key}'{_component(schema)}"
        if typo:
            message += f" ('{typo[0]}' looks like a misspelling of it)"
        yield path, message + (f"; expected {expected}" if expected else "")


def _enum(err) -> str:
    path, inst, choices = tuple(err.absolute_path), err.instance, [str(c) for c in err.validator_value]
    category = err.schema.get("x-category")
    what = f"{category} kind" if category else "kind" if path and path[-1] == "kind" else "value"
    hint = f"; {BOOL_HINT}" if isinstance(inst, bool) else ""
    shown = show(inst) if not isinstance(inst, (dict, list)) else f"({show(inst)})"
    return f"unknown {what} {shown}{suggest(inst, choices)} (expected one of: {', '.join(choices)}){hint}"


def _pattern(err) -> str:
    literal = _LITERALS.match(err.validator_value)
    if literal:
        choices = literal.group(1).split("|")
        return f"unknown value {show(err.instance)}{suggest(err.instance, choices)} " \
               f"(expected {_desc(err.schema) or ' or '.join(choices)})"
    return f"{show(err.instance)} does not match the pattern {err.validator_value}" + \
        (f"; expected {_desc(err.schema)}" if _desc(err.schema) else "")


_RANGE = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def explain(err, files: dict) -> Iterator[tuple[tuple, str]]:
    """``(path, message)`` pairs for one ValidationError."""
    path, kind, value, inst, schema = (tuple(err.absolute_path), err.validator, err.validator_value,
                                       err.instance, err.schema)
    if kind == "additionalProperties" and isinstance(inst, dict):
        yield from _unknown_keys(err, files)
    elif kind == "required" and isinstance(inst, dict):
        yield from _missing(err, files)
    elif kind == "type":
        expected = value if isinstance(value, list) else [value]
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected)
        yield path, f"expected {names}, got {describe(inst)}{type_hint(set(expected), inst, schema)}"
    elif kind == "enum":
        yield path, _enum(err)
    elif kind == "const":
        yield path, f"expected {show(value)}, got {describe(inst)}"
    elif kind in _RANGE:
        yield path, f"{show(inst)} is out of range; expected a value {_RANGE[kind]} {value}"
    elif kind in ("minItems", "maxItems"):
        bound = "at least" if kind == "minItems" else "at most"
        yield path, f"expected {bound} {value} item{'s' if value != 1 else ''}, got {len(inst)}"
    elif kind in ("minLength", "maxLength"):
        yield path, ("must not be empty" if kind == "minLength" and not inst else
                     f"expected {'at least' if kind == 'minLength' else 'at most'} {value} characters")
    elif kind == "uniqueItems":
        yield path, "the items must be unique"
    elif kind == "pattern":
        yield path, _pattern(err)
    elif kind == "multipleOf":
        yield path, f"{show(inst)} is not a multiple of {value}"
    elif kind in ("oneOf", "anyOf") and err.context:
        # the branch the value was meant for fails a deeper rule than "wrong type" or "not this constant"
        deeper = [e for e in err.context if e.validator not in ("type", "enum", "const")]
        yield from explain(best_match(deeper or err.context), files)
    else:
        yield path, f"invalid value (the schema's '{kind}' rule fails)" + \
            (f"; expected {_desc(schema)}" if _desc(schema) else "")
