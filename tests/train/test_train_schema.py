"""schemas/train.schema.json: conventions, defaults agreeing with the specs, validation, registry agreement."""
from __future__ import annotations

import dataclasses
import json

import pytest

from nanodecoder.config.schema import compile_files, schema_files, schema_kinds
from nanodecoder.resources import schemas_dir
from nanodecoder.runtime import RuntimeSpec
from nanodecoder.train.optim import AdamWConfig
from nanodecoder.train.schedule import WSD, Constant, Cosine
from nanodecoder.train.spec import LoggingSpec, SampleSpec, TrainSpec, WandbSpec

SCHEMA = json.loads((schemas_dir() / "train.schema.json").read_text())
DEFS = SCHEMA["$defs"]
KIND_BLOCKS = ("optimizer", "schedule")


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
    for name in ("train", "logging", "sample", "runtime", "optimizer", "optimizer.adamw",
                 "schedule", "schedule.cosine", "schedule.wsd", "schedule.constant"):
        assert name in DEFS


def test_every_object_closed_and_every_property_described():
    for path, obj in objects(SCHEMA):
        if path.split("/")[-1] in KIND_BLOCKS or path.endswith("/if"):
            continue  # kind blocks are closed by their if/then branches; `if` only tests `kind`
        assert obj.get("additionalProperties") is False, path
        for key, prop in obj["properties"].items():
            assert prop.get("description"), f"{path}/properties/{key} has no description"


@pytest.mark.parametrize("defn, cls", [
    ("train", TrainSpec), ("logging", LoggingSpec), ("wandb", WandbSpec), ("sample", SampleSpec),
    ("runtime", RuntimeSpec), ("optimizer.adamw", AdamWConfig), ("schedule.cosine", Cosine.Params),
    ("schedule.wsd", WSD.Params), ("schedule.constant", Constant.Params)])
def test_schema_defaults_match_the_specs(defn, cls):
    instance = cls()
    for f in dataclasses.fields(cls):
        prop = DEFS[defn]["properties"][f.name]
        if "default" not in prop:
            assert f.name in ("optimizer", "schedule", "wandb"), f"{defn}.{f.name} documents no default"
            continue
        value = getattr(instance, f.name)
        assert (list(value) if isinstance(value, tuple) else value) == prop["default"], f"{defn}.{f.name}"
    assert set(DEFS[defn]["properties"]) - {"kind"} == {f.name for f in dataclasses.fields(cls)}


def section_validator(section: str):
    files = schema_files()
    files["section.json"] = {"$ref": f"train.schema.json#/$defs/{section}"}
    return compile_files(files, "section.json")


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
    from nanodecoder.registry import registries
    files = schema_files()
    for category in ("optimizer", "schedule"):
        assert schema_kinds(files, category) == registries()[category].names()


def test_spec_from_dict_applies_defaults_and_nesting():
    t = TrainSpec.from_dict({"steps": 5, "optimizer": {"kind": "adamw", "eps": 1e-6},
                             "schedule": {"kind": "wsd"}})
    assert t.steps == 5 and t.batch_size == TrainSpec.batch_size
    assert t.optimizer.kind == "adamw" and dict(t.optimizer.params) == {"eps": 1e-6}
    assert t.schedule.to_dict() == {"kind": "wsd"}
    assert dataclasses.asdict(t)["optimizer"] == {"kind": "adamw", "params": {"eps": 1e-6}}
    assert TrainSpec.from_dict(None).optimizer.kind == "adamw"
    assert TrainSpec.from_dict({"grad_clip": 0}).clip is None
    lg = LoggingSpec.from_dict({"wandb": {"mode": "offline", "tags": ["x"]}})
    assert lg.wandb.tags == ("x",) and lg.runs_dir == "runs"
    with pytest.raises(ValueError, match="unknown keys"):
        SampleSpec.from_dict({"temp": 1})
