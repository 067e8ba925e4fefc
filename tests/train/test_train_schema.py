"""The train, logging, sample and runtime sections of the generated schema (schemas/blueprint.schema.json):
conventions, defaults agreeing with the declarations, validation, registry agreement."""
from __future__ import annotations

import dataclasses
import json

import pytest

from nanodecoder.cli.blueprint import RunSpec
from nanodecoder.cli.catalog import builtin_catalog, catalog
from nanodecoder.config.declare import BuildError, build, params, to_yaml, yaml_key
from nanodecoder.config.schema import compile_schema
from nanodecoder.config.validate import schema_of
from nanodecoder.resources import schemas_dir
from nanodecoder.runtime import RuntimeSpec
from nanodecoder.train.optim import AdamW
from nanodecoder.train.schedule import WSD, Constant, Cosine
from nanodecoder.train.spec import LoggingSpec, SampleSpec, TrainSpec, WandbSpec

SCHEMA = json.loads((schemas_dir() / "blueprint.schema.json").read_text())
GENERATED = schema_of(RunSpec, builtin_catalog())
DEFS = SCHEMA["$defs"]
KIND_BLOCKS = ("optimizer", "schedule")
SECTIONS = ("train", "logging", "wandb", "sample", "runtime", "optimizer", "optimizer.adamw",
            "schedule", "schedule.cosine", "schedule.wsd", "schedule.constant")


def objects(node, path="#"):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for k, v in node.items():
            yield from objects(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from objects(v, f"{path}/{i}")


def test_top_level_conventions():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "$id" not in SCHEMA
    for name in SECTIONS:
        assert name in DEFS


def test_committed_sections_are_the_generated_ones():
    for name in SECTIONS:
        assert DEFS[name] == GENERATED["$defs"][name], f"schemas/blueprint.schema.json $defs/{name} is out of date"


def test_every_object_closed_and_every_property_described():
    for path, obj in (item for name in SECTIONS for item in objects(DEFS[name], f"#/$defs/{name}")):
        if path.split("/")[-1] in KIND_BLOCKS or path.endswith("/if"):
            continue  # kind blocks are closed by their if/then branches; `if` only tests `kind`
        assert obj.get("additionalProperties") is False, path
        for key, prop in obj["properties"].items():
            assert prop.get("description"), f"{path}/properties/{key} has no description"


KINDS = {AdamW.Spec: ("adamw", AdamW), Cosine.Spec: ("cosine", Cosine), WSD.Spec: ("wsd", WSD),
         Constant.Spec: ("constant", Constant)}


@pytest.mark.parametrize("defn, cls", [
    ("train", TrainSpec), ("logging", LoggingSpec), ("wandb", WandbSpec), ("sample", SampleSpec),
    ("runtime", RuntimeSpec), ("optimizer.adamw", AdamW.Spec), ("schedule.cosine", Cosine.Spec),
    ("schedule.wsd", WSD.Spec), ("schedule.constant", Constant.Spec)])
def test_schema_defaults_match_the_specs(defn, cls):
    kind, impl = KINDS.get(cls, (None, None))
    instance = build(cls, {}, catalog(), **({"kind": kind, "impl": impl} if kind else {}))
    for f, _ in params(cls):
        prop = DEFS[defn]["properties"][yaml_key(f)]
        value = getattr(instance, f.name)
        if "default" not in prop:
            assert f.name == "wandb" and value == WandbSpec(), f"{defn}.{f.name} documents no default"
            continue
        if f.name in KIND_BLOCKS:         # a kind block's default is the kind taken when it is absent
            assert prop["default"] == {"kind": value.kind}, f"{defn}.{f.name}"
            continue
        assert (list(value) if isinstance(value, tuple) else value) == prop["default"], f"{defn}.{f.name}"
    assert set(DEFS[defn]["properties"]) - {"kind"} == {yaml_key(f) for f, _ in params(cls)}


def section_validator(section: str):
    validator, _ = compile_schema({"$ref": f"#/$defs/{section}", "$defs": GENERATED["$defs"]}, "section.json")
    return validator


def errors(section: str, value) -> list[str]:
    return sorted(".".join(map(str, e.absolute_path)) + ": " + e.message
                  for e in section_validator(section).iter_errors(value))


def test_valid_sections_pass():
    assert errors("train", {"steps": 10, "lr": 1e-3, "grad_clip": None,
                            "optimizer": {"kind": "adamw", "betas": [0.9, 0.99], "implementation": "foreach"},
                            "schedule": {"kind": "wsd", "decay_fraction": 0.1, "decay_shape": "sqrt"}}) == []
    assert errors("logging", {"wandb": {"mode": "offline", "tags": ["a"]}, "progress": False}) == []
    assert errors("sample", {"prompt": "", "top_p": 0.9, "top_k": None, "temperature": 0}) == []
    assert errors("runtime", {"profile": "cpu", "device": "cuda:1", "threads": 2}) == []


@pytest.mark.parametrize("section, value, expect", [
    ("train", {"steps": 0}, "steps"),
    ("train", {"stepz": 3}, "stepz"),
    ("train", {"lr": "1e-3"}, "lr"),
    ("train", {"nan_policy": "ignore"}, "nan_policy"),
    ("train", {"optimizer": {"kind": "adamw", "betas": [0.9]}}, "optimizer.betas"),
    ("train", {"optimizer": {"kind": "adam"}}, "optimizer.kind"),
    ("train", {"optimizer": {"kind": "adamw", "momentum": 0.9}}, "momentum"),
    ("train", {"schedule": {"kind": "cosine", "decay_fraction": 0.2}}, "decay_fraction"),
    ("train", {"schedule": {"kind": "wsd", "decay_fraction": 0}}, "schedule.decay_fraction"),
    ("logging", {"wandb": {"mode": "cloud"}}, "wandb.mode"),
    ("sample", {"top_p": 1.5}, "top_p"),
    ("runtime", {"device": "tpu"}, "device"),
])
def test_invalid_values_are_rejected(section, value, expect):
    found = errors(section, value)
    assert found and any(expect in e for e in found), found


def test_registry_agrees_with_schema_kinds():
    for category in KIND_BLOCKS:
        names = catalog()[category].names()
        assert DEFS[category]["properties"]["kind"]["enum"] == names
        assert [b["if"]["properties"]["kind"]["const"] for b in DEFS[category]["allOf"]] == names
        assert [b["then"]["$ref"] for b in DEFS[category]["allOf"]] == [f"#/$defs/{category}.{n}" for n in names]


def test_build_applies_defaults_and_nesting():
    t = build(TrainSpec, {"steps": 5, "optimizer": {"kind": "adamw", "eps": 1e-6},
                          "schedule": {"kind": "wsd"}}, catalog())
    assert t.steps == 5 and t.batch_size == TrainSpec.batch_size
    assert t.optimizer.kind == "adamw" and t.optimizer.impl is AdamW and t.optimizer.eps == 1e-6
    assert t.optimizer == build(AdamW.Spec, {"eps": 1e-6}, kind="adamw", impl=AdamW)   # the other params default
    assert t.schedule.impl is WSD and to_yaml(t.schedule) == {
        "kind": "wsd", "warmup_steps": 100, "decay_fraction": 0.2, "decay_shape": "linear", "min_lr_ratio": 0.0}
    assert to_yaml(t)["optimizer"] == {"kind": "adamw", "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1,
                                       "decay_embeddings": True, "implementation": "auto", "rules": []}
    assert dataclasses.is_dataclass(t.optimizer) and t.optimizer.betas == (0.9, 0.95)
    default = build(TrainSpec, None, catalog())
    assert default.optimizer.kind == "adamw" and default.schedule.kind == "cosine"
    assert build(TrainSpec, {"grad_clip": 0}, catalog()).clip is None
    lg = build(LoggingSpec, {"wandb": {"mode": "offline", "tags": ["x"]}}, catalog())
    assert lg.wandb.tags == ("x",) and lg.runs_dir == "runs"
    with pytest.raises(BuildError, match="unknown keys"):
        build(SampleSpec, {"temp": 1}, catalog())
    assert isinstance(BuildError("x"), ValueError)
