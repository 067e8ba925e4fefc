"""Schema handling behind the messages: generated schemas, plug-in kinds, anyOf/oneOf, shipped blueprints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from nanodecoder import components
from nanodecoder.cli.blueprint import RunSpec, load_blueprint
from nanodecoder.cli.catalog import REGISTERS, builtin_catalog
from nanodecoder.components.contracts import NormKind
from nanodecoder.config.declare import context, declared, param
from nanodecoder.config.messages import explain
from nanodecoder.config.registry import make_catalog
from nanodecoder.config.schema import compile_schema
from nanodecoder.config.validate import schema_of, without_follow_ons

BLUEPRINTS = sorted((Path(__file__).resolve().parents[2] / "blueprints").glob("*.yaml"))
MODEL = {"context_length": 8, "d_model": 16, "n_layers": 2, "vocab_size": 32,
         "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}}


def messages(schema: dict, instance: dict) -> list[str]:
    validator, files = compile_schema(schema)
    return [f"{'.'.join(map(str, path))}: {m}"
            for err in without_follow_ons(list(validator.iter_errors(instance)))
            for path, m in explain(err, files)]


def blueprint_schema(catalog=None) -> dict:
    return schema_of(RunSpec, catalog or builtin_catalog())


class ScaleNorm(nn.Module):
    """||x|| normalisation with one learned scale."""

    @declared
    class Spec(NormKind):
        eps: float = param(1e-5, doc="Epsilon.")
        dim: int = context("d_model")

        @property
        def n_params(self):
            return 1


def test_plug_in_kinds_are_checked_against_their_own_declaration():
    catalog = make_catalog(components.register, plugins=False)
    catalog["norm"].add("scalenorm", ScaleNorm, origin="plug-in 'x'")
    for register in REGISTERS[1:]:
        register(catalog)
    schema = blueprint_schema(catalog)
    block = {**MODEL["block"], "norm": {"kind": "scalenorm", "epz": 1.0}}
    assert messages(schema, {"model": {**MODEL, "block": block}}) == [
        "model.block.norm.epz: unknown key 'epz' for norm kind 'scalenorm'; did you mean 'eps'? "
        "(allowed here: eps, kind)"]
    block["norm"] = {"kind": "scalenrm"}
    assert messages(schema, {"model": {**MODEL, "block": block}}) == [
        "model.block.norm.kind: unknown norm kind 'scalenrm'; did you mean 'scalenorm'? "
        f"(expected one of: {', '.join(catalog['norm'].names())})"]
    assert schema["$defs"]["norm.scalenorm"]["properties"]["eps"] == {"type": "number", "description": "Epsilon.",
                                                                      "default": 1e-5}


def test_any_of_reports_the_best_branch_without_dumping_the_schema():
    schema = {"type": "object", "properties": {"size": {
        "anyOf": [{"type": "integer", "minimum": 1}, {"enum": ["auto"]}], "description": "A size."}}}
    assert messages(schema, {"size": 0}) == ["size: 0 is out of range; expected a value >= 1"]
    (got,) = messages(schema, {"size": {"a": [1, 2, 3]}})
    assert "{" not in got and "[" not in got


def test_integers_are_strict_but_whole_floats_get_a_hint():
    got = messages(blueprint_schema(), {"model": {**MODEL, "n_layers": 2.0}})
    assert got == ["model.n_layers: expected an integer, got the number 2.0; write 2"]


@pytest.mark.parametrize("path", BLUEPRINTS, ids=lambda p: p.stem)
def test_every_shipped_blueprint_validates(path):
    bp = load_blueprint(path)
    assert bp.raw["model"] and bp.lines[("model",)][1] >= 1


def _properties(node, where=""):
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield f"{where}/properties/{key}", sub
        for key, sub in node.items():
            if key != "if":                       # the kind test inside "if" needs no description
                yield from _properties(sub, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _properties(sub, f"{where}/{i}")


def committed() -> dict[str, dict]:
    folder = Path(__file__).resolve().parents[2] / "schemas"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_every_schema_property_has_a_description():
    missing = [f"{name}{where}" for name, schema in committed().items()
               for where, sub in _properties(schema) if isinstance(sub, dict) and not sub.get("description")]
    assert not missing


def kind_blocks():
    for fname, schema in committed().items():
        for key, block in schema.get("$defs", {}).items():
            if "." not in key and "allOf" in block and "enum" in block.get("properties", {}).get("kind", {}):
                yield fname, key, block


@pytest.mark.parametrize("fname,category,block", list(kind_blocks()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_kind_has_its_own_closed_parameter_schema(fname, category, block):
    """What "checked against the schema of the chosen kind only" relies on."""
    files = committed()
    assert block.get("required") == ["kind"]
    kinds = block["properties"]["kind"]["enum"]
    assert kinds == builtin_catalog()[category].names()
    branches = {entry["if"]["properties"]["kind"]["const"]: entry["then"]["$ref"] for entry in block["allOf"]}
    assert sorted(branches) == sorted(kinds)
    for kind, ref in branches.items():
        target_file, _, pointer = ref.partition("#")
        assert pointer == f"/$defs/{category}.{kind}"
        params = files[target_file or fname]["$defs"][f"{category}.{kind}"]
        assert params["additionalProperties"] is False and params["properties"]["kind"]["const"] == kind
