"""JSON Schemas generated from the declarations (:mod:`.declare`), and the validator built on them.

One code path for every kind, built-in or plug-in: a declared section class
becomes ``$defs["<name>"]`` (``snake(ClassName)`` without ``Spec``), the block
that chooses a kind of ``category`` becomes ``$defs["<category>"]`` (a
``kind`` enum of the registered names plus one ``if kind == x then
$defs["<category>.<x>"]`` entry per kind), and each kind's parameters
``$defs["<category>.<kind>"]``.  ``schemas/*.json`` in the repository are what
:func:`generate` writes for the built-ins (``tools/write_schemas.py``), for
editors; validation always uses the schema generated in memory, so a
plug-in's kinds are checked exactly like the built-ins'.

Before use the schema is *prepared*: ``$ref`` made absolute (``file#/pointer``),
kind schemas tagged ``x-component: "mlp.gelu"`` and kind enums
``x-category: "mlp"`` (for messages), ``$schema`` dropped (at a ``$ref``
jsonschema would otherwise switch to the stock validator class of the dialect
and lose our strict ``integer``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import MISSING
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import extend
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .declare import allowed_kinds, default_of, hints, is_declared, params, required, snake, strip_none

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# YAML tells integers from floats: ``n_layers: 12.0`` is not an integer here
# (JSON Schema would accept it, and range(12.0) would fail much later).
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
Validator = extend(Draft202012Validator, type_checker=_TYPES)

_PRIMITIVE = {bool: "boolean", int: "integer", float: "number", str: "string"}


def first_paragraph(cls) -> str:
    """A class's docstring up to the first blank line, on one line ("" when it has none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        return ""                        # the signature dataclasses writes for an undocumented class
    return " ".join(doc.strip().split("\n\n")[0].split())


def _json(value: Any) -> Any:
    return [_json(v) for v in value] if isinstance(value, tuple) else value


class Generator:
    """Collects ``$defs`` while walking declared classes (one instance per schema file)."""

    def __init__(self, catalog, category_docs: dict[str, str]):
        self.catalog, self.category_docs = catalog, category_docs
        self.defs: dict[str, dict] = {}
        self.owners: dict[str, Any] = {}

    @staticmethod
    def ref(name: str) -> dict:
        return {"$ref": f"#/$defs/{name}"}

    def _claim(self, name: str, owner: Any) -> bool:
        """True if ``name`` still needs its definition; an error if another owner has it."""
        if name in self.owners:
            if self.owners[name] != owner:
                raise ValueError(f"schema definition '{name}' is claimed by {self.owners[name]} and {owner}")
            return False
        self.owners[name] = owner
        self.defs[name] = {}
        return True

    def section(self, cls) -> str:
        name = getattr(cls, "SCHEMA_NAME", None) or snake(cls.__name__)
        if self._claim(name, cls):
            self.defs[name] = self.object(cls)
        return name

    def kind_block(self, category: str) -> str:
        """``$defs[category]``: ``{kind: ..., params}`` with ``kind`` required (a default applies to an absent block)."""
        if not self._claim(category, category):
            return category
        reg = self.catalog[category]
        kinds = reg.names()
        branches = []
        for kind in kinds:
            impl = reg.get(kind)
            key = f"{category}.{kind}"
            if self._claim(key, impl):
                self.defs[key] = self.object(impl.Spec, kind=kind, doc=first_paragraph(impl))
            branches.append({"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                             "then": self.ref(key)})
        doc = self.category_docs.get(category, f"A {category}")
        self.defs[category] = {"type": "object", "description": f"{doc}: {{kind: {'|'.join(kinds)}, ...}}.",
                               "required": ["kind"],
                               "properties": {"kind": {"enum": kinds, "description": f"Which {category} to use."}},
                               "allOf": branches}
        return category

    def object(self, cls, kind: str | None = None, doc: str | None = None) -> dict:
        props: dict[str, Any] = {}
        if kind is not None:
            props["kind"] = {"const": kind, "description": "Component kind."}
        needed = []
        th = hints(cls)
        for f, meta in params(cls):
            key = meta.key or f.name
            props[key] = self.field(f, meta, th[f.name])
            if required(f):
                needed.append(key)
        out: dict[str, Any] = {"type": "object", "additionalProperties": False}
        doc = first_paragraph(cls) if doc is None else doc
        if doc:
            out["description"] = doc
        if needed:
            out["required"] = needed
        out["properties"] = props
        return out

    def field(self, f, meta, tp) -> dict:
        if meta.category is not None:
            out = self.ref(self.kind_block(meta.category))
        elif meta.names is not None:              # the registered names (plug-ins included) this one allows
            out = {"enum": [*allowed_kinds(self.catalog, meta), *([None] if strip_none(tp)[1] else [])]}
        else:
            out = self.type(tp, dict(meta.bounds))
        out.update(dict(meta.keywords))
        out["description"] = meta.doc
        default = default_of(f)
        if meta.category is not None:
            default = {"kind": default} if default not in (MISSING, None) else MISSING
        if default is not MISSING and not dataclasses.is_dataclass(default):
            out["default"] = _json(default)
        return out

    def type(self, tp, bounds: dict) -> dict:
        """The schema of a value of type ``tp`` (bounds apply to its numbers)."""
        tp, nullable = strip_none(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp in _PRIMITIVE:
            out: dict[str, Any] = {"type": _PRIMITIVE[tp]}
            if tp in (int, float):
                out.update(bounds)
        elif origin is typing.Literal:
            out = {"enum": list(args)}
        elif origin is tuple:
            item = args[0] if args else typing.Any
            out = {"type": "array", "items": self.type(item, bounds) if item is not typing.Any else {}}
            if args and args[-1] is not Ellipsis:
                out["minItems"] = out["maxItems"] = len(args)
        elif is_declared(tp):
            out = self.ref(self.section(tp))
        elif origin is typing.Union or origin is types.UnionType:
            out = self._union(args, bounds)
        elif tp is typing.Any:
            out = {}
        else:
            raise TypeError(f"no schema for the declared type {tp!r}")
        if nullable and not is_declared(tp):       # an optional section is absent, never null
            if "type" in out:
                out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
            elif "enum" in out:
                out["enum"] = [*out["enum"], None]
            else:
                out = {"anyOf": [out, {"type": "null"}]}
        return out

    def _union(self, args: tuple, bounds: dict) -> dict:
        """``int | Literal["auto"]`` -> one schema of both types (the words as a pattern);
        ``tuple[int, ...] | Range`` -> a list or that mapping, in one schema."""
        types_: list[str] = []
        out: dict[str, Any] = {}
        words: list[str] = []
        for a in args:
            if typing.get_origin(a) is typing.Literal:
                words += [str(w) for w in typing.get_args(a)]
                if "string" not in types_:
                    types_.append("string")
            elif is_declared(a):
                inner = self.object(a)
                types_.append("object")
                out.update({k: v for k, v in inner.items() if k not in ("type", "description")})
            else:
                part = self.type(a, bounds)
                t = part.pop("type")
                types_ += [t] if isinstance(t, str) else t
                out.update(part)
        if words:
            out["pattern"] = "^(" + "|".join(words) + ")$" if len(words) > 1 else f"^{words[0]}$"
        return {"type": types_, **out}


def document(root, catalog, category_docs: dict[str, str], title: str) -> dict:
    """The whole schema file whose top level is the declared class ``root``."""
    gen = Generator(catalog, category_docs)
    top = gen.object(root)
    out = {"$schema": DIALECT, "title": title, **top}
    if gen.defs:
        out["$defs"] = dict(sorted(gen.defs.items()))
    return out


def dumps(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- using a generated schema
def resolve_ref(files: dict[str, dict], ref: str) -> dict | None:
    """The schema an absolute ``file#/pointer`` reference names, or None."""
    fname, _, pointer = ref.partition("#")
    node: Any = files.get(fname)
    for token in [t for t in pointer.split("/") if t]:
        token = token.replace("~1", "/").replace("~0", "~")
        node = node.get(token) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def target(files: dict[str, dict], schema: dict) -> dict:
    """Follow ``$ref`` chains (prepared schemas) to the schema that describes a value."""
    for _ in range(20):
        if "$ref" not in schema:
            break
        schema = resolve_ref(files, schema["$ref"]) or {}
    return schema


def _absolute_refs(node: Any, fname: str) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            node["$ref"] = fname + ref if ref.startswith("#") else (ref if "#" in ref else ref + "#")
        for v in node.values():
            _absolute_refs(v, fname)
    elif isinstance(node, list):
        for v in node:
            _absolute_refs(v, fname)


def prepare(files: dict[str, dict]) -> dict[str, dict]:
    """Absolute refs and the ``x-component`` / ``x-category`` tags (in place)."""
    for fname, schema in files.items():
        schema.pop("$schema", None)
        _absolute_refs(schema, fname)
        for key, sub in schema.get("$defs", {}).items():
            if "." in key:
                sub["x-component"] = key
            elif isinstance(sub.get("properties", {}).get("kind"), dict) and "enum" in sub["properties"]["kind"]:
                sub["properties"]["kind"]["x-category"] = key
    return files


def _uri(name: str) -> str:
    return f"https://schemas.nanodecoder.invalid/{name}"  # in-memory only, never fetched


def compile_schema(schema: dict, name: str = "schema.json"):
    """``(validator, prepared files)`` for one generated schema document."""
    files = prepare({name: copy.deepcopy(schema)})
    files[name]["$id"] = _uri(name)
    resource = Resource.from_contents(files[name], default_specification=DRAFT202012)
    return Validator(files[name], registry=Registry().with_resources([(_uri(name), resource)])), files


__all__ = ["Generator", "Validator", "compile_schema", "document", "dumps", "first_paragraph", "prepare",
           "resolve_ref", "target"]
