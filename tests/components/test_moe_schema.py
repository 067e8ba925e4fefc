"""The generated schema of the MoE layer and its routers: valid Draft 2020-12, in agreement with the declarations."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from nanodecoder.cli.blueprint import RunSpec
from nanodecoder.cli.catalog import catalog
from nanodecoder.components import component_spec
from nanodecoder.components.moe import MoE
from nanodecoder.config.declare import params as declared_params
from nanodecoder.config.validate import problems

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "blueprint.schema.json").read_text())
ROUTERS = catalog()["router"]


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
    defs = SCHEMA["$defs"]
    props = [p for key in defs if key == "mlp.moe" or key.startswith("router") for p in _walk(defs[key], key)]
    assert len(props) > 20
    assert not [p for p, sub in props if not sub.get("description")]


def test_schema_agrees_with_code():
    defs = SCHEMA["$defs"]
    assert set(defs["mlp.moe"]["properties"]) == {"kind"} | {f.name for f, _ in declared_params(MoE.Spec)}
    assert defs["mlp.moe"]["additionalProperties"] is False
    assert defs["mlp.moe"]["properties"]["router"] == {"$ref": "#/$defs/router", "default": {"kind": "topk"},
                                                       "description": defs["mlp.moe"]["properties"]["router"]["description"]}
    assert defs["router"]["properties"]["kind"]["enum"] == ROUTERS.names()
    for kind in ROUTERS.names():
        cls = ROUTERS.get(kind)
        block = defs[f"router.{kind}"]
        fields = {f.name for f, _ in declared_params(cls.Spec)}
        assert set(block["properties"]) == fields | {"kind"}, kind
        assert {"dim", "n_experts", "top_k"} <= {f.name for f in dataclasses.fields(cls.Spec)}
        assert block["additionalProperties"] is False and block["properties"]["kind"]["const"] == kind
    thens = [entry["then"]["$ref"] for entry in defs["router"]["allOf"]]
    assert thens == [f"#/$defs/router.{k}" for k in defs["router"]["properties"]["kind"]["enum"]]


def mlp_problems(mlp: dict) -> list[str]:
    """Every validation message (schema and cross-field checks) of a blueprint whose block MLP is ``mlp``."""
    raw = {"model": {"vocab_size": 32, "context_length": 16, "d_model": 32, "n_layers": 2,
                     "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": mlp}}}
    return [f"{p.path}: {p.message}" for p in problems(raw, {}, "bp.yaml", RunSpec, catalog())]


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
    assert mlp_problems(params) == []
    assert isinstance(component_spec("mlp", params, d_model=32).build(), MoE)


@pytest.mark.parametrize("params,word", BAD)
def test_bad_params_fail(params, word):
    got = mlp_problems(params)
    assert got and word in " ".join(got), got
