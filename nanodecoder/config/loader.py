"""Blueprint files -> raw dict + line map, with ``extends`` resolved.

* ``yaml.SafeLoader`` only; every duplicated key is an error (PyYAML would
  silently keep the last one).  YAML merge keys (``<<: *anchor``) work.
* Every key path maps to ``(file shown to the user, 1-based line)`` so later
  errors can point at the YAML; paths are tuples of keys and list indices.
* ``extends: other.yaml`` (relative to the file) deep-merges the child over
  its base: mappings merge key by key, lists and scalars replace, and a
  component block whose ``kind`` changes is replaced whole, and ``null`` over
  an inherited mapping (``data: null``) removes that section.  Inherited keys
  keep the base file's locations.  Cycles are an error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import BlueprintError, Problem

Location = tuple[str, "int | None"]     # (file shown to the user, 1-based line)
LineMap = dict[tuple, Location]


def blueprint_path(raw: str, base_dir: str | Path) -> Path:
    """A file a blueprint names: as written when absolute, else relative to the blueprint's folder ``base_dir``."""
    return Path(raw) if os.path.isabs(raw) else Path(base_dir) / raw


def dotted(path: tuple) -> str:
    """``("model", "overrides", 0, "mlp")`` -> ``model.overrides[0].mlp``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else \
            (f".{_key(part)}" if out else _key(part))
    return out


def _key(k: Any) -> str:
    return ("true" if k else "false") if isinstance(k, bool) else "null" if k is None else str(k)


def locate(lines: LineMap, path: tuple, default_file: str) -> Location:
    """The location of ``path``, or of its closest ancestor that has one."""
    p = tuple(path)
    while p not in lines:
        if not p:
            return (default_file, None)
        p = p[:-1]
    return lines[p]


class YamlProblem(Exception):
    """A YAML text could not be read: ``(path, line, what is wrong, how to fix it)`` items."""

    def __init__(self, items: list[tuple[tuple, int | None, str, str]]):
        super().__init__(items)
        self.items = items


def _syntax_problem(e: yaml.MarkedYAMLError) -> tuple[str, str]:
    what = (e.problem or e.context or "invalid YAML").strip()
    if "\\t" in what or "\t" in what:
        return "YAML syntax error: a tab character", "indent with spaces, YAML does not allow tabs"
    if "single document" in f"{e.context} {e.problem}":
        return "YAML syntax error: more than one document", "a blueprint is one YAML document, remove the extra '---'"
    if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
        what += f" ({e.context} started on line {e.context_mark.line + 1})"
    return f"YAML syntax error: {what}", "check the indentation, the space after each ':' and closing brackets/quotes"


MAX_VALUES = 100_000     # YAML aliases can make a small file expand enormously ("billion laughs")
MAX_CHARS = 1_000_000    # a real blueprint is a few kB; checked before parsing
MAX_DEPTH = 64           # nesting of mappings and lists; PyYAML's composer recurses once per level

_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _limits(text: str) -> None:
    """Refuse, before any recursion or construction, text that is too large, too deep or has too many values
    (the scanner is iterative: this costs one linear pass)."""
    if len(text) > MAX_CHARS:
        raise YamlProblem([((), None, f"the file has {len(text):,} characters, more than the {MAX_CHARS:,} a "
                                      "blueprint may have", "a blueprint is a few kB of settings; is this the "
                                                            "right file?")])
    depth = values = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlProblem([((), token.start_mark.line + 1, f"mappings and lists nested more than "
                                    f"{MAX_DEPTH} levels deep", "a blueprint needs a few levels; flatten it")])
        elif isinstance(token, _CLOSE):
            depth -= 1
        elif isinstance(token, yaml.ScalarToken):
            values += 1
            if values > 2 * MAX_VALUES:          # keys and values are both scalars
                raise YamlProblem([((), token.start_mark.line + 1, f"the file holds more than {MAX_VALUES:,} "
                                    "keys and values", "a blueprint has a few hundred; is this the right file?")])


def _reader_problem(e: yaml.reader.ReaderError, text: str) -> YamlProblem:
    """A character YAML does not allow (a control character, NUL): where it is and which."""
    before = text[:e.position] if isinstance(e.position, int) else ""
    line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
    char = e.character if isinstance(e.character, str) else chr(e.character)
    name = {"\x00": "NUL", "\x1b": "ESC", "\x07": "BEL", "\x08": "backspace", "\x7f": "DEL"}.get(char, "")
    shown = f"U+{ord(char):04X}" + (f" ({name})" if name else "")
    return YamlProblem([((), line, f"the control character {shown} at column {column} is not allowed in YAML",
                         "remove it (blueprints are plain text)")])


def read_yaml(text: str) -> tuple[Any, dict[tuple, int]]:
    """Parse one YAML document into ``(data, {path: line})``; raises YamlProblem.

    ``data`` is None for an empty document.
    """
    try:
        _limits(text)
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:
        raise _reader_problem(e, text) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlProblem([((), mark.line + 1 if mark else None, *_syntax_problem(e))]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        walk = _Walk(loader)
        walk.node(node, ())
        if walk.problems:
            raise YamlProblem(walk.problems)
        return loader.construct_document(node), walk.lines
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        what = (e.problem or "").split(" for the tag ")[-1].strip()
        raise YamlProblem([((), mark.line + 1 if mark else None, f"YAML tag {what or 'here'} is not allowed",
                            "a blueprint holds plain data only: mappings, lists, strings, numbers, booleans")]) \
            from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlProblem([((), mark.line + 1 if mark else None, *_syntax_problem(e))]) from None
    except yaml.YAMLError as e:
        raise YamlProblem([((), None, f"YAML error: {str(e).splitlines()[0]}", "fix the YAML")]) from None
    finally:
        loader.dispose()


class _Walk:
    """Records the line of every key and list item; collects duplicate keys and other problems."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader, self.lines, self.problems = loader, {}, []
        self.ancestors: set[int] = set()
        self.count = 0

    def node(self, node: yaml.Node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self.count += 1
        line = node.start_mark.line + 1
        if id(node) in self.ancestors:
            self.problems.append((path, line, "a YAML alias that contains itself", "remove the recursive alias"))
            return
        if self.count > MAX_VALUES:
            if self.count == MAX_VALUES + 1:
                self.problems.append(((), None, f"the blueprint expands to more than {MAX_VALUES:,} values "
                                               "through YAML aliases", "write it out without nested aliases"))
            return
        self.ancestors.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.node(item, path + (i,))
        elif isinstance(node, yaml.MappingNode):
            self.mapping(node, path)
        self.ancestors.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: tuple) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append((path, line, "a key must be a plain name, not a list or a mapping",
                                      "fix the key"))
                continue
            key = self.loader.construct_object(key_node)
            if key in seen:
                self.problems.append((path + (key,), line, f"duplicate key '{_key(key)}' (first on line {seen[key]})",
                                      "YAML would silently keep only the last one; remove one of them"))
            seen[key] = line
        self.loader.flatten_mapping(node)       # resolve ``<<`` merge keys; explicit keys come last and win
        for key_node, value in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.loader.construct_object(key_node)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self.node(value, path + (key,))


def parse_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    """Parse a blueprint's text; return ``(data, line map)``.  Raises BlueprintError."""
    try:
        data, lines = read_yaml(text)
    except YamlProblem as e:
        raise BlueprintError([Problem(file, dotted(p), line, f"{what}; {fix}") for p, line, what, fix in e.items]) \
            from None
    if data is None:
        raise BlueprintError([Problem(file, "", None, "the file is empty; a blueprint needs at least a "
                                                      "'model:' section")])
    return data, {p: (file, line) for p, line in lines.items()}


def display(path: Path) -> str:
    """How a file is shown in messages: relative to the current directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _read(path: Path, shown: str) -> str:
    if not path.is_file():
        raise BlueprintError([Problem(shown, "", None, "file not found; give the path of a blueprint YAML "
                                                       "file (or a shipped name such as gpt2_124m)")])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BlueprintError([Problem(shown, "", None, f"not UTF-8 text (byte {e.start}); save the "
                                                       "blueprint as UTF-8")]) from None
    except OSError as e:
        raise BlueprintError([Problem(shown, "", None, f"cannot read the file: {e.strerror}")]) from None


_KINDS = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def load_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, LineMap]:
    """Load one blueprint file and, recursively, what it ``extends``."""
    path = Path(path)
    shown = display(path)
    data, lines = parse_yaml(_read(path, shown), shown)
    if not isinstance(data, dict):
        raise BlueprintError([Problem(shown, "", lines[()][1], "a blueprint must be a mapping of sections "
                                      f"(model:, train:, ...), got {_KINDS.get(type(data), type(data).__name__)}")])
    if "extends" not in data:
        return data, lines
    parent = data.pop("extends")
    line = lines.pop(("extends",))[1]
    if not isinstance(parent, str) or not parent.strip():
        raise BlueprintError([Problem(shown, "extends", line, "expected the file name of another blueprint, "
                                                              "e.g. 'extends: gpt2_124m.yaml'")])
    base_path = path.parent / parent
    here = path.resolve()
    if base_path.resolve() in chain + (here,):
        cycle = " -> ".join(display(p) for p in chain + (here, base_path.resolve()))
        raise BlueprintError([Problem(shown, "extends", line, f"'extends' cycle: {cycle}; "
                                                              "remove the 'extends' that closes the loop")])
    if not base_path.is_file():
        looked = f" (looked for {display(base_path)})" if display(base_path) != parent else ""
        raise BlueprintError([Problem(shown, "extends", line, f"extended blueprint '{parent}' not found{looked}; "
                                                              "the path is relative to this file")])
    base, base_lines = load_file(base_path, chain + (here,))
    out_lines: LineMap = {}
    return merge(base, data, base_lines, lines, (), out_lines), out_lines


def merge(base: Any, child: Any, base_lines: LineMap, child_lines: LineMap, path: tuple, out: LineMap) -> Any:
    """Deep-merge ``child`` over ``base`` (mappings merge, the rest replaces); fill ``out`` with locations.

    A component block whose ``kind`` changes is replaced whole: the base's
    parameters belong to the other kind (``mlp: {kind: moe, ...}`` over
    ``mlp: {kind: gelu, hidden_size: 768}`` must not inherit ``hidden_size``).
    ``null`` over an inherited mapping removes it: the child has no such section.
    """
    kind_changed = (isinstance(base, dict) and isinstance(child, dict)
                    and "kind" in child and child.get("kind") != base.get("kind"))
    if kind_changed or not (isinstance(base, dict) and isinstance(child, dict)):
        _copy_lines(child_lines, path, out)
        return child
    out[path] = child_lines.get(path) or base_lines[path]
    merged = {}
    for k in list(base) + [k for k in child if k not in base]:
        if k in base and isinstance(base[k], dict) and k in child and child[k] is None:
            continue                # ``data: null`` over an inherited section: the child has none
        if k in child and k in base:
            merged[k] = merge(base[k], child[k], base_lines, child_lines, path + (k,), out)
        else:
            merged[k] = child[k] if k in child else base[k]
            _copy_lines(child_lines if k in child else base_lines, path + (k,), out)
    return merged


def _copy_lines(src: LineMap, prefix: tuple, dst: LineMap) -> None:
    n = len(prefix)
    dst.update({p: loc for p, loc in src.items() if p[:n] == prefix})
