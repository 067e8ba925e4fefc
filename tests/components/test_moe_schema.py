"""schemas/moe.schema.json: a valid Draft 2020-12 schema that agrees with the code."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from nanodecoder.components.base import ModelContext
from nanodecoder.components.moe import _PARAMS, MoE
from nanodecoder.components.routers import ROUTERS

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "moe.schema.json").read_text())
URI = "https://schemas.nanodecoder.invalid/"


def validator() -> Draft202012Validator:
    """Validate an mlp block the way the model schema does: a $ref into moe.schema.json."""
    moe = {**SCHEMA, "$id": URI + "moe.schema.json"}
    registry = Registry().with_resource(moe["$id"], Resource.from_contents(moe, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": URI + "moe.schema.json#/$defs/mlp.moe"}, registry=registry)


def test_is_a_valid_schema_without_id():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema" and "$id" not in SCHEMA


def _walk(node, path=""):
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{path}.{name}", sub
        for key, sub in node.items():
            if key != "if":            # the kind switch's conditions are not documented properties
                yield from _walk(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _walk(sub, f"{path}[{i}]")


def test_every_property_has_a_description():
    props = list(_walk(SCHEMA))
    assert len(props) > 20
    assert not [p for p, sub in props if not sub.get("description")]


def test_schema_agrees_with_code():
    defs = SCHEMA["$defs"]
    assert set(defs["mlp.moe"]["properties"]) == set(_PARAMS)
    assert defs["mlp.moe"]["additionalProperties"] is False
    assert defs["mlp.moe"]["properties"]["router"] == {"$ref": "#/$defs/router",
                                                       "description": defs["mlp.moe"]["properties"]["router"]["description"]}
    assert sorted(defs["router"]["properties"]["kind"]["enum"]) == sorted(ROUTERS)
    for kind, cls in ROUTERS.items():
        block = defs[f"router.{kind}"]
        fields = {f.name for f in dataclasses.fields(cls.Spec)} - {"dim", "n_experts", "top_k"}
        assert set(block["properties"]) == fields | {"kind"}, kind
        assert block["additionalProperties"] is False and block["properties"]["kind"]["const"] == kind
    thens = [entry["then"]["$ref"] for entry in defs["router"]["allOf"]]
    assert thens == [f"#/$defs/router.{k}" for k in defs["router"]["properties"]["kind"]["enum"]]


GOOD = [
    {"kind": "moe", "n_experts": 8, "top_k": 2},
    {"kind": "moe", "n_experts": 8, "top_k": 2, "expert_kind": "gelu", "expert_hidden": 64, "n_shared_experts": 1,
     "router": {"kind": "topk", "renormalize": False}, "capacity_factor": 1.25, "eval_capacity_factor": None,
     "min_capacity": 2, "drop_policy": "position", "lb_loss_coef": 0.0, "lb_loss_type": "sequence",
     "z_loss_coef": 0.0, "bias": True, "dispatch": "loop"},
    {"kind": "moe", "n_experts": 4, "top_k": 1, "router": {"kind": "switch", "jitter": 0.01},
     "expert_hidden_mult": 1.5},
    {"kind": "moe", "n_experts": 16, "top_k": 4, "router": {"kind": "sigmoid", "routed_scaling_factor": 2.5,
                                                            "bias_update_speed": 0.001}, "lb_loss_coef": 0.0001},
    {"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"kind": "noisy_topk"}, "dispatch": "grouped_mm"},
]

BAD = [
    ({"kind": "moe", "top_k": 2}, "n_experts"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "experts": 3}, "experts"),
    ({"kind": "moe", "n_experts": 8, "top_k": 0}, "top_k"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"kind": "topk", "jitter": 0.1}}, "jitter"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"kind": "expert_choice"}}, "expert_choice"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"renormalize": True}}, "kind"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "expert_hidden": 64, "expert_hidden_mult": 2.0}, "expert_hidden"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "capacity_factor": 0}, "capacity_factor"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "capacity_factor": "1.25"}, "capacity_factor"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "drop_policy": "random"}, "drop_policy"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"kind": "switch", "jitter": 1.0}}, "jitter"),
    ({"kind": "moe", "n_experts": 8, "top_k": 2, "router": {"kind": "sigmoid", "bias_update_speed": -1}}, "bias"),
]


@pytest.mark.parametrize("params", GOOD)
def test_examples_validate_and_build(params):
    errors = list(validator().iter_errors(params))
    assert not errors, [e.message for e in errors]
    MoE.make_spec(params, ModelContext(d_model=32, n_layers=2, context_length=16, vocab_size=32))


@pytest.mark.parametrize("params,word", BAD)
def test_bad_params_fail(params, word):
    errors = list(validator().iter_errors(params))
    assert errors
    text = " ".join(e.message + " " + ".".join(map(str, e.absolute_path)) + " " + json.dumps(e.instance)
                    for e in errors)
    assert word in text
