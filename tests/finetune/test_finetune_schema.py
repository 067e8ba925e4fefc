"""The finetune and eval parts of schemas/blueprint.schema.json: defaults agree with the specs; sections validate."""
from __future__ import annotations

import json
from dataclasses import MISSING

import pytest
import yaml

from evalhelpers import lm_raw
from nanodecoder.cli.blueprint import load_blueprint, run_spec
from nanodecoder.config import BlueprintError
from nanodecoder.config.declare import Kind, default_of, params, to_yaml, yaml_key
from nanodecoder.eval.spec import HellaSwagEvalSpec, TextEvalSpec
from nanodecoder.finetune import InstructionTuning
from nanodecoder.finetune.spec import ClassificationSpec, InstructionSpec, TemplateSpec
from nanodecoder.resources import blueprints_dir, schemas_dir

DEFS = json.loads((schemas_dir() / "blueprint.schema.json").read_text())["$defs"]


@pytest.mark.parametrize("name, cls", [
    ("finetune.instruction", InstructionSpec), ("finetune.classification", ClassificationSpec),
    ("template", TemplateSpec), ("hellaswag_eval", HellaSwagEvalSpec), ("text_eval", TextEvalSpec)])
def test_schema_properties_and_defaults_match_the_specs(name, cls):
    props = DEFS[name]["properties"]
    fields = {yaml_key(f): f for f, _ in params(cls)}
    assert set(props) == set(fields) | ({"kind"} if issubclass(cls, Kind) else set())
    assert "source" not in props and ("from" in props) == issubclass(cls, Kind)
    for key, f in fields.items():
        default = default_of(f)
        if "default" in props[key]:
            assert props[key]["default"] == default, key
        elif key != "template":
            assert default is MISSING, f"{name}.{key} has a default the schema does not document"
            assert key in DEFS[name].get("required", []), f"{name}.{key} documents no default and is not required"


def write(tmp_path, **sections):
    raw = lm_raw(tmp_path)
    raw.update(sections)
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_sections_become_typed_specs(tmp_path):
    bp = load_blueprint(write(tmp_path, finetune={"kind": "instruction", "from": "runs/x", "data": "d.json",
                                                  "template": {"end": "<END>"}},
                              eval={"hellaswag": {"data": "hs.jsonl", "every": 100}}))
    spec = run_spec(bp)
    ft = spec.finetune
    assert isinstance(ft, InstructionSpec) and ft.impl is InstructionTuning
    assert ft.kind == "instruction" and ft.source == "runs/x" and ft.template.end == "<END>"
    assert ft.template.prompt.startswith("Below is an instruction")
    assert to_yaml(ft)["from"] == "runs/x" and "source" not in to_yaml(ft)
    ev = spec.eval
    assert ev.hellaswag.every == 100 and ev.hellaswag.batch_size == 8 and ev.text is None


@pytest.mark.parametrize("sections, message", [
    ({"finetune": {"kind": "instruction", "data": "d.json"}},
     "missing required key 'from' for finetune kind 'instruction'"),
    ({"finetune": {"kind": "classification", "from": "r", "data": "d.csv"}},
     "missing required key 'n_classes'"),
    ({"finetune": {"kind": "classifier", "from": "r", "data": "d.csv"}}, "did you mean 'classification'?"),
    ({"finetune": {"kind": "classification", "from": "r", "data": "d.csv", "n_classes": 2, "train_last_blocks": 3}},
     "finetune.train_last_blocks (line 40): 3 is more than the model's 2 blocks"),
    ({"finetune": {"kind": "instruction", "from": "r", "data": "d", "batching": "packed"}}, "finetune.batching"),
    ({"eval": {"hellaswag": {"data": "x", "limit": 0}}}, "eval.hellaswag.limit"),
    ({"eval": {"mmlu": {}}}, "eval.mmlu"),
])
def test_bad_sections_are_reported_with_their_path(tmp_path, sections, message):
    with pytest.raises(BlueprintError) as e:
        load_blueprint(write(tmp_path, **sections))
    assert message in str(e.value)


def test_the_shipped_sft_blueprint_is_an_instruction_run_of_dense_gpt():
    bp = load_blueprint(blueprints_dir() / "sft_dense_gpt.yaml")
    dense = load_blueprint(blueprints_dir() / "dense_gpt.yaml")
    assert bp.raw["finetune"]["kind"] == "instruction" and bp.raw["model"] == dense.raw["model"]
