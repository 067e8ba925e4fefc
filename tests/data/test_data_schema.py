"""The data section of schemas/blueprint.schema.json: valid JSON Schema, follows the project's conventions,
agrees with the code."""
from __future__ import annotations

import json
from dataclasses import MISSING
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from nanodecoder.cli.blueprint import RunSpec
from nanodecoder.cli.catalog import builtin_catalog
from nanodecoder.config.declare import default_of, params, yaml_key
from nanodecoder.config.validate import schema_of

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "blueprint.schema.json"
DATA_DEFS = ("data", "data_source", "tokenizer")


def is_data_def(name: str) -> bool:
    return name.split(".")[0] in DATA_DEFS


@pytest.fixture(scope="module")
def full_schema():
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def schema(full_schema):
    """The ``data:`` section as a schema document of its own (its ``$defs`` shared with the blueprint's)."""
    return {"$schema": full_schema["$schema"], **full_schema["$defs"]["data"], "$defs": full_schema["$defs"]}


@pytest.fixture(scope="module")
def validator(schema):
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(validator, data):
    return sorted((list(e.absolute_path), e.message) for e in validator.iter_errors(data))


def test_schema_is_valid_draft_2020_12_without_id(full_schema, schema):
    Draft202012Validator.check_schema(full_schema)
    assert full_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "$id" not in full_schema
    assert full_schema["properties"]["data"]["$ref"] == "#/$defs/data"
    assert schema["properties"]["source"]["$ref"] == "#/$defs/data_source"
    assert schema["properties"]["tokenizer"]["$ref"] == "#/$defs/tokenizer"


def test_the_file_is_what_the_code_generates(full_schema):
    generated = schema_of(RunSpec, builtin_catalog())
    data_defs = {k: v for k, v in generated["$defs"].items() if is_data_def(k)}
    assert data_defs == {k: v for k, v in full_schema["$defs"].items() if is_data_def(k)}
    assert generated["properties"]["data"] == full_schema["properties"]["data"]


def _objects(node, path="$"):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for k, v in node.items():
            yield from _objects(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _objects(v, f"{path}[{i}]")


def test_every_property_has_a_description_and_objects_are_closed(full_schema):
    defs = {k: v for k, v in full_schema["$defs"].items() if is_data_def(k)}
    assert set(defs) > {"data", "data_source", "tokenizer", "data_source.text", "tokenizer.bpe"}
    for name, node in defs.items():
        for path, obj in _objects(node, f"$/$defs/{name}"):
            if "/if" in path:    # the `if kind == x` conditions are not properties of the data
                continue
            for key, prop in obj.get("properties", {}).items():
                assert prop.get("description"), f"{path}/properties/{key} lacks a description"
            is_kind_block = path in ("$/$defs/data_source", "$/$defs/tokenizer")
            if not is_kind_block:
                assert obj.get("additionalProperties") is False, f"{path} is not closed"


@pytest.mark.parametrize("category", ["data_source", "tokenizer"])
def test_kind_blocks_follow_the_convention_and_match_the_registry(schema, regs, category):
    # the validator finds the block as $defs[category] with a `kind` enum (nanodecoder/config/schema.py)
    block = schema["$defs"][category]
    assert block["required"] == ["kind"]
    kinds = block["properties"]["kind"]["enum"]
    assert kinds == sorted(kinds) == regs[category].names()
    refs = {b["if"]["properties"]["kind"]["const"]: b["then"]["$ref"] for b in block["allOf"]}
    assert refs == {k: f"#/$defs/{category}.{k}" for k in kinds}
    for k in kinds:
        params = schema["$defs"][f"{category}.{k}"]
        assert params["properties"]["kind"] == {"const": k, "description": params["properties"]["kind"]["description"]}
        assert params["additionalProperties"] is False


@pytest.mark.parametrize("category", ["data_source", "tokenizer"])
def test_schema_defaults_equal_the_spec_defaults(schema, regs, category):
    for kind in regs[category].names():
        props = schema["$defs"][f"{category}.{kind}"]["properties"]
        fields = {yaml_key(f): f for f, _ in params(regs[category].get(kind).Spec)}
        assert set(props) == {"kind", *fields}, kind
        for name, f in fields.items():
            default = default_of(f)
            if default is MISSING:
                assert "default" not in props[name], f"{kind}.{name}"
            else:
                assert props[name]["default"] == default, f"{kind}.{name}"


def test_valid_sections_pass(validator):
    good = [
        {"source": {"kind": "python_stdlib", "val_fraction": 0.02, "max_bytes": None},
         "tokenizer": {"kind": "bpe", "vocab_size": 4096}, "sampling": "random"},
        {"source": {"kind": "text", "path": "data/*.txt"}, "tokenizer": {"kind": "char"}},
        {"source": {"kind": "url", "url": "https://example.org/a.txt", "sha256": "ab" * 32, "timeout": 5},
         "tokenizer": {"kind": "tiktoken", "name": "gpt2"}, "sampling": "sequential"},
        {"source": {"kind": "python_stdlib", "max_bytes": 100000}, "tokenizer": {"kind": "byte"}},
    ]
    for data in good:
        assert errors(validator, data) == []


def test_invalid_sections_are_reported_at_the_right_path(validator):
    assert errors(validator, {"source": {"kind": "text", "path": "a", "val_fracton": 0.1},
                              "tokenizer": {"kind": "byte"}}) == \
        [(["source"], "Additional properties are not allowed ('val_fracton' was unexpected)")]
    assert errors(validator, {"source": {"kind": "url", "url": "ftp://x", "sha256": "zz"},
                              "tokenizer": {"kind": "byte"}}) == \
        [(["source", "sha256"], "'zz' does not match '^[0-9a-fA-F]{64}$'"),
         (["source", "url"], "'ftp://x' does not match '^https?://'")]
    assert [p for p, _ in errors(validator, {"source": {"kind": "python_stdlib", "val_fraction": 0.9},
                                             "tokenizer": {"kind": "bpe", "vocab_size": 100}})] == \
        [["source", "val_fraction"], ["tokenizer", "vocab_size"]]
    assert [p for p, _ in errors(validator, {"source": {"kind": "csv"}, "tokenizer": {"kind": "tiktoken"},
                                             "sampling": "shuffled", "extra": 1})] == \
        [[], ["sampling"], ["source", "kind"], ["tokenizer"]]
