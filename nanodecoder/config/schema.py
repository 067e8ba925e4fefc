"""Loading the JSON Schemas in ``schemas/``, extending them with plug-ins, building the validator.

Conventions (every schema file follows them):
* a component's parameter schema is ``$defs["<category>.<kind>"]`` in any file
  (``"norm.rmsnorm"``, ``"mlp.moe"``, ``"tokenizer.bpe"``) and includes
  ``kind`` among its ``properties`` with ``additionalProperties: false``;
* the block that chooses a kind is ``$defs["<category>"]``: an object with a
  required ``kind`` enum and one ``{"if": {"required": ["kind"], "properties": {"kind": {"const": x}}},
  "then": {"$ref": ...x}}`` entry per kind in ``allOf`` so only the chosen kind's parameters are checked.

Before use the schemas are *prepared*: every ``$ref`` is made absolute
(``file#/pointer``), component schemas are tagged ``x-component: "mlp.gelu"``
and kind enums ``x-category: "mlp"`` (for messages), and a ``$ref`` to a
missing file or definition becomes ``{"not": {}, "x-missing": ref}`` so
validation reports it as a problem instead of crashing.  ``$schema`` is
dropped from each file: at a ``$ref`` jsonschema would otherwise switch to the
stock validator class for that dialect and lose our strict ``integer``.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import extend
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from ..resources import schemas_dir

ROOT = "blueprint.schema.json"

# YAML tells integers from floats: ``n_layers: 12.0`` is not an integer here
# (JSON Schema would accept it, and range(12.0) would fail much later).
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
Validator = extend(Draft202012Validator, type_checker=_TYPES)


@functools.lru_cache(maxsize=None)
def _raw_schemas() -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted(schemas_dir().glob("*.schema.json"))}


def schema_files() -> dict[str, dict]:
    """File name -> schema (deep copies, safe to modify)."""
    return copy.deepcopy(_raw_schemas())


def kind_block(files: dict[str, dict], category: str) -> tuple[str, dict]:
    """The file and ``$defs`` entry of the block that chooses a ``category`` kind."""
    for name, schema in files.items():
        if category in schema.get("$defs", {}):
            return name, schema["$defs"][category]
    raise KeyError(f"no schema defines the '{category}' block")


def schema_kinds(files: dict[str, dict], category: str) -> list[str]:
    """The kinds a schema block allows (for the schema/registry agreement test)."""
    return sorted(kind_block(files, category)[1]["properties"]["kind"]["enum"])


def with_plugins(files: dict[str, dict], registries) -> dict[str, dict]:
    """Add every plug-in component's kind and ``PARAMS_SCHEMA`` to its block."""
    for category, reg in registries.items():
        try:
            fname, block = kind_block(files, category)
        except KeyError:
            continue
        enum = block["properties"]["kind"]["enum"]
        for kind in reg.names():
            if kind in enum:
                continue
            params = copy.deepcopy(getattr(reg.get(kind), "PARAMS_SCHEMA", None) or {"type": "object"})
            params.setdefault("type", "object")
            params.setdefault("properties", {})["kind"] = {"const": kind, "description": "component kind"}
            params.setdefault("additionalProperties", False)
            key = f"{category}.{kind}"
            files[fname]["$defs"][key] = params
            enum.append(kind)
            block.setdefault("allOf", []).append(
                {"if": {"required": ["kind"], "properties": {"kind": {"const": kind}}},
                 "then": {"$ref": f"#/$defs/{key}"}})
    return files


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


def prepare(files: dict[str, dict]) -> dict[str, dict]:
    """Absolute refs, ``x-component`` / ``x-category`` tags, missing refs made harmless (in place)."""
    for fname, schema in files.items():
        schema.pop("$schema", None)
        _absolute_refs(schema, fname)
        for key, sub in schema.get("$defs", {}).items():
            if "." in key:
                sub["x-component"] = key
            elif isinstance(sub.get("properties", {}).get("kind"), dict) and "enum" in sub["properties"]["kind"]:
                sub["properties"]["kind"]["x-category"] = key
    for schema in files.values():
        _mark_missing(schema, files)
    return files


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


def _mark_missing(node: Any, files: dict[str, dict]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and resolve_ref(files, ref) is None:
            del node["$ref"]
            node.update({"not": {}, "x-missing": ref.rstrip("#")})
        for v in list(node.values()):
            _mark_missing(v, files)
    elif isinstance(node, list):
        for v in node:
            _mark_missing(v, files)


def _uri(name: str) -> str:
    return f"https://schemas.nanodecoder.invalid/{name}"  # in-memory only, never fetched


def _signature(registries) -> tuple:
    return tuple((c, tuple(r.names())) for c, r in (registries or {}).items())


def compile_files(files: dict[str, dict], root: str = ROOT):
    """Prepare ``files`` (in place) and return a validator for ``root`` that resolves them all."""
    prepare(files)
    resources = []
    for name, schema in files.items():
        schema["$id"] = _uri(name)
        resources.append((_uri(name), Resource.from_contents(schema, default_specification=DRAFT202012)))
    return Validator(files[root], registry=Registry().with_resources(resources))


_CACHE: dict[tuple, tuple] = {}


def prepared(registries=None, root: str = ROOT):
    """``(validator, files)`` for ``root``: a Draft 2020-12 validator (strict integers) and
    the prepared schema files it uses; cached per set of registered kinds."""
    key = (_signature(registries), root)
    if key not in _CACHE:
        files = schema_files()
        if registries is not None:
            files = with_plugins(files, registries)
        _CACHE[key] = (compile_files(files, root), files)
    return _CACHE[key]


def build_validator(registries=None, root: str = ROOT):
    """A Draft 2020-12 validator for ``root`` with all schema files resolvable."""
    return prepared(registries, root)[0]
