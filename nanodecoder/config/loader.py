"""Blueprint loading: YAML -> raw dict with a line map, ``extends`` and ``--set`` applied.

* ``yaml.SafeLoader`` only; a duplicated key is an error (PyYAML silently keeps
  the last one).
* Every key path maps to ``(file, line)`` so later errors can point at the YAML.
* ``extends: other.yaml`` (relative to the file) deep-merges the child over its
  base (mappings merge, everything else replaces); cycles are an error.
* ``--set a.b.c=value`` overrides are parsed as YAML and applied before
  validation, so they get exactly the same checks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import BlueprintError, Problem

Location = tuple[str, int | None]   # (file shown to the user, 1-based line)


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(key, line, seen[key])
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _DuplicateKey(Exception):
    def __init__(self, key, line, first):
        self.key, self.line, self.first = key, line, first


def _line_map(node: yaml.Node, file: str, path: tuple, out: dict[tuple, Location]) -> None:
    out[path] = (file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = (file, k.start_mark.line + 1)
            _line_map(v, file, path + (key,), out)
            out[path + (key,)] = (file, k.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, file, path + (i,), out)


def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple, Location]]:
    """Parse one YAML document; return (data, line map).  Raises BlueprintError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise BlueprintError([Problem(file, "", None, "the file is empty; a blueprint needs at least a "
                                          "'model' section (see blueprints/dense_gpt.yaml)")])
        data = loader.construct_document(node)
    except _DuplicateKey as e:
        raise BlueprintError([Problem(file, str(e.key), e.line,
                                      f"duplicate key '{e.key}' (first defined on line {e.first}); "
                                      "YAML would silently keep only the last one - remove one of them")]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = e.problem or str(e)
        raise BlueprintError([Problem(file, "", line, f"YAML syntax error: {what}; fix the YAML syntax "
                                      "(indentation, ':' after keys, matching brackets and quotes)")]) from None
    except yaml.YAMLError as e:
        raise BlueprintError([Problem(file, "", None, f"YAML error: {e}")]) from None
    finally:
        loader.dispose()
    lines: dict[tuple, Location] = {}
    _line_map(node, file, (), lines)
    return data, lines


def _merge(base: Any, child: Any, base_lines: dict, child_lines: dict, path: tuple, out_lines: dict) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        merged = {}
        for k in list(base) + [k for k in child if k not in base]:
            if k in child and k in base:
                merged[k] = _merge(base[k], child[k], base_lines, child_lines, path + (k,), out_lines)
            elif k in child:
                merged[k] = child[k]
                _copy_lines(child_lines, path + (k,), out_lines)
            else:
                merged[k] = base[k]
                _copy_lines(base_lines, path + (k,), out_lines)
        if path in child_lines:
            out_lines[path] = child_lines[path]
        return merged
    _copy_lines(child_lines, path, out_lines)
    return child


def _copy_lines(src: dict, prefix: tuple, dst: dict) -> None:
    n = len(prefix)
    for p, loc in src.items():
        if p[:n] == prefix:
            dst[p] = loc


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[tuple, Location]]:
    """Load one blueprint file and, recursively, what it ``extends``."""
    path = Path(path)
    shown = _display(path)
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(_display(p) for p in chain + (real,))
        raise BlueprintError([Problem(shown, "extends", None,
                                      f"'extends' cycle: {cycle}; a blueprint cannot extend itself")])
    if not path.is_file():
        raise BlueprintError([Problem(shown, "", None, "file not found; give the path of a blueprint "
                                      "YAML file (or a shipped name such as dense_gpt)")])
    data, lines = parse_yaml(path.read_text(encoding="utf-8"), shown)
    if not isinstance(data, dict):
        raise BlueprintError([Problem(shown, "", 1, f"a blueprint must be a mapping of sections, "
                                      f"got {type(data).__name__}; start with 'model:'")])
    parent = data.pop("extends", None)
    if parent is None:
        return data, lines
    line = lines.get(("extends",), (shown, None))[1]
    if not isinstance(parent, str) or not parent:
        raise BlueprintError([Problem(shown, "extends", line,
                                      "expected the file name of another blueprint, e.g. 'extends: dense_gpt.yaml'")])
    base_path = path.parent / parent
    if not base_path.is_file():
        raise BlueprintError([Problem(shown, "extends", line,
                                      f"extended blueprint '{parent}' not found (looked for {_display(base_path)}); "
                                      "the path is relative to this file")])
    base, base_lines = load_file(base_path, chain + (real,))
    out_lines: dict[tuple, Location] = {}
    merged = _merge(base, data, base_lines, lines, (), out_lines)
    return merged, out_lines


def apply_overrides(data: dict, lines: dict, overrides: list[str]) -> None:
    """Apply ``a.b.c=value`` strings in place; problems are collected."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem("--set", key or item, None,
                                    f"'{item}' is not of the form dotted.key=value, e.g. --set train.lr=3.0e-4"))
            continue
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError as e:
            problems.append(Problem("--set", key, None, f"value '{text}' is not valid YAML: {e}"))
            continue
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem("--set", key, None,
                                        f"cannot set '{key}': '{'.'.join(parts[:i + 1])}' is a "
                                        f"{type(child).__name__}, not a section"))
                break
            node = child
        else:
            node[parts[-1]] = value
            _copy_lines({}, tuple(parts), lines)
            for p in [p for p in lines if p[:len(parts)] == tuple(parts)]:
                del lines[p]
            lines[tuple(parts)] = ("--set", None)
    if problems:
        raise BlueprintError(problems)
