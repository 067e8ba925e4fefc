"""Loading the JSON Schemas in ``schemas/`` and extending them with plug-ins.

Conventions (every schema file follows them):
* a component's parameter schema is ``$defs["<category>.<kind>"]`` in any file
  (``"norm.rmsnorm"``, ``"mlp.moe"``, ``"tokenizer.bpe"``) and includes
  ``kind`` among its ``properties`` with ``additionalProperties: false``;
* the block that chooses a kind is ``$defs["<category>"]``: an object with a
  required ``kind`` enum and one ``{"if": {"required": ["kind"], "properties": {"kind": {"const": x}}},
  "then": {"$ref": ...x}}`` entry per kind in ``allOf`` so only the chosen kind's parameters are checked.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from ..resources import schemas_dir

ROOT = "blueprint.schema.json"


@functools.lru_cache(maxsize=None)
def _raw_schemas() -> dict[str, dict]:
    out = {}
    for f in sorted(schemas_dir().glob("*.schema.json")):
        out[f.name] = json.loads(f.read_text())
    return out


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


def _uri(name: str) -> str:
    return f"https://schemas.nanodecoder.invalid/{name}"  # in-memory only, never fetched


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
            params = getattr(reg.get(kind), "PARAMS_SCHEMA", None) or {"type": "object"}
            params = copy.deepcopy(params)
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


def build_validator(registries=None, root: str = ROOT):
    """A Draft 2020-12 validator for ``root`` with all schema files resolvable."""
    from jsonschema import Draft202012Validator

    files = schema_files()
    if registries is not None:
        files = with_plugins(files, registries)
    resources = []
    for name, schema in files.items():
        schema = dict(schema)
        schema["$id"] = _uri(name)
        files[name] = schema
        resources.append((_uri(name), Resource.from_contents(schema, default_specification=DRAFT202012)))
    registry = Registry().with_resources(resources)
    return Draft202012Validator(files[root], registry=registry)


def description_of(schema: dict[str, Any]) -> str:
    return schema.get("description", "")
