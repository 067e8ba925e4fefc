"""``--set dotted.key=value`` overrides, applied to the raw blueprint before validation.

The value is parsed as YAML (``3.0e-4`` is a float, ``{kind: rope}`` a mapping,
an empty value is null); numeric parts index lists (``model.overrides.0.mlp``).
Missing sections are created, so ``--set`` can add new keys; the schema then
checks the result exactly like a value written in the file.
"""
from __future__ import annotations

from typing import Any

from .errors import SET, Problem
from .loader import LineMap, YamlProblem, read_yaml

_EXAMPLE = "write dotted.key=value, e.g. --set train.lr=3.0e-4"


class _Bad(Exception):
    """One override that cannot be applied: ``(shown path, message)``."""


def _what(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"the value {'null' if v is None else str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    return {str: "a string", list: "a list"}.get(type(v), type(v).__name__)


def parse(item: str) -> tuple[tuple, Any]:
    """``"a.b.0=v"`` -> ``(("a", "b", 0), parsed v)``; raises _Bad."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise _Bad(item, f"'{item}' has no '='; {_EXAMPLE}")
    if not key:
        raise _Bad(item, f"no key before '='; {_EXAMPLE}")
    parts = key.split(".")
    if any(not p.strip() for p in parts):
        raise _Bad(key, f"empty name between dots in '{key}'; {_EXAMPLE}")
    try:
        value, _ = read_yaml(text)
    except YamlProblem as e:
        _, _, what, fix = e.items[0]
        if what.startswith("YAML syntax error: "):
            what, fix = what.replace("YAML syntax error: ", ""), "quote the value or fix it"
        raise _Bad(key, f"value {text!r} is not valid YAML: {what}; {fix}") from None
    return tuple(int(p) if p.isdigit() else p.strip() for p in parts), value


def _set(data: dict, path: tuple, value: Any, shown: str) -> tuple:
    """Put ``value`` at ``path``; return the path as used (list indices int, keys str)."""
    node: Any = data
    used = []
    for i, part in enumerate(path):
        last = i == len(path) - 1
        here = ".".join(map(str, path[:i]))
        if isinstance(node, list):
            if not isinstance(part, int):
                raise _Bad(shown, f"'{here}' is a list; index it with a number, e.g. {here}.0")
            if part >= len(node):
                raise _Bad(shown, f"index {part} does not exist; '{here}' has {len(node)} "
                                  f"entr{'y' if len(node) == 1 else 'ies'}")
        elif isinstance(node, dict):
            part = str(part)
            if not last and node.get(part) is None:
                if isinstance(path[i + 1], int):
                    raise _Bad(shown, f"'{'.'.join(map(str, path[:i + 1]))}' does not exist, so it has no "
                                      f"entry {path[i + 1]}")
                node[part] = {}
        else:
            raise _Bad(shown, f"cannot set '{shown}': '{here}' is {_what(node)}, not a section")
        used.append(part)
        if last:
            node[part] = value
        else:
            node = node[part]
    return tuple(used)


def apply_overrides(data: dict, lines: LineMap, overrides: list[str]) -> list[Problem]:
    """Apply ``key=value`` strings to ``data`` in place, in order; return the problems found."""
    problems = []
    for item in overrides:
        try:
            path, value = parse(item)
            path = _set(data, path, value, ".".join(map(str, path)))
        except _Bad as e:
            shown, message = e.args
            problems.append(Problem(SET, shown, None, message))
            continue
        for p in [p for p in lines if p[:len(path)] == path]:
            del lines[p]
        for n in range(1, len(path) + 1):
            lines.setdefault(path[:n], (SET, None))
    return problems
