"""schemas/finetune.schema.json and eval.schema.json: defaults agree with the specs; sections validate."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from evalhelpers import lm_raw
from nanodecoder.config import BlueprintError, load_blueprint
from nanodecoder.eval.spec import EvalSpec, HellaSwagEvalSpec, TextEvalSpec
from nanodecoder.finetune.spec import ClassificationSpec, FinetuneSpec, InstructionSpec, TemplateSpec, params_to_yaml
from nanodecoder.resources import blueprints_dir, schemas_dir

FT = json.loads((schemas_dir() / "finetune.schema.json").read_text())["$defs"]
EV = json.loads((schemas_dir() / "eval.schema.json").read_text())["$defs"]


@pytest.mark.parametrize("defs, name, cls", [
    (FT, "finetune.instruction", InstructionSpec), (FT, "finetune.classification", ClassificationSpec),
    (FT, "template", TemplateSpec), (EV, "hellaswag_eval", HellaSwagEvalSpec), (EV, "text_eval", TextEvalSpec)])
def test_schema_properties_and_defaults_match_the_specs(defs, name, cls):
    props = defs[name]["properties"]
    fields = {("from" if f.name == "source" else f.name): f for f in dataclasses.fields(cls)}
    assert set(props) == set(fields)
    for key, f in fields.items():
        if "default" in props[key]:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert props[key]["default"] == default, key
        elif key not in ("kind", "template"):
            assert key in defs[name].get("required", []), f"{name}.{key} documents no default and is not required"


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
    ft = FinetuneSpec.from_dict(bp.raw["finetune"])
    assert ft.kind == "instruction" and ft.params.source == "runs/x" and ft.params.template.end == "<END>"
    assert ft.params.template.prompt.startswith("Below is an instruction")
    assert params_to_yaml(ft.params)["from"] == "runs/x"
    ev = EvalSpec.from_dict(bp.raw["eval"])
    assert ev.hellaswag.every == 100 and ev.hellaswag.batch_size == 8 and ev.text is None


@pytest.mark.parametrize("sections, message", [
    ({"finetune": {"kind": "instruction", "data": "d.json"}},
     "missing required key 'from' for finetune kind 'instruction'"),
    ({"finetune": {"kind": "classification", "from": "r", "data": "d.csv"}},
     "missing required key 'n_classes'"),
    ({"finetune": {"kind": "classifier", "from": "r", "data": "d.csv"}}, "did you mean 'classification'?"),
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
