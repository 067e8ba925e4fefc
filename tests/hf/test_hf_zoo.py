"""The zoo blueprints against transformers' own configs and modules: the config.json we would write for a zoo
architecture, read back through transformers' config class, imports as the same blueprint; and at the zoo's
own widths (depth cut to a few layers, on the meta device) our model and transformers' have the same number
of parameters."""
from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanodecoder.cli.blueprint import blueprint_model_spec  # noqa: E402
from nanodecoder.hf import hf_family_for  # noqa: E402
from nanodecoder.hf.convert import comparable, hf_model_section  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402

# zoo blueprint -> (its Hugging Face model_type, layers kept for the count: past every distinct leading layer)
ZOO = {"gpt2_124m": ("gpt2", 2), "gpt2_medium": ("gpt2", 2), "llama3_1_8b": ("llama", 2),
       "qwen3_8b": ("qwen3", 2), "mixtral_8x7b": ("mixtral", 2), "qwen3_30b_a3b": ("qwen3_moe", 2),
       "olmoe_1b_7b": ("olmoe", 2), "gpt_oss_120b": ("gpt_oss", 2), "deepseek_v3": ("deepseek_v3", 4),
       "gemma3_4b": ("gemma3_text", 6)}


def hf_config(name: str):
    spec = blueprint_model_spec(f"zoo/{name}")[1]
    fam, config = hf_family_for(spec)
    config = dict(config)
    model_type = config.pop("model_type")
    return spec, fam, transformers.AutoConfig.for_model(model_type, **config)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())        # parameters() lists a tied matrix once


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_architecture_round_trips_through_transformers(name):
    spec, fam, cfg = hf_config(name)
    want_type, layers = ZOO[name]
    assert fam.model_type == cfg.model_type == want_type
    _, section = hf_model_section(cfg.to_dict())              # transformers' config class, defaults filled
    if spec.mtp is not None:           # deepseek_v3: the config records the MTP module; transformers drops it
        assert cfg.num_nextn_predict_layers == spec.mtp.depth
        spec = dataclasses.replace(spec, mtp=None)
    assert comparable(build_model_spec(section)) == comparable(spec)

    cfg.num_hidden_layers = layers                              # the zoo's widths, fewer layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(cfg)
    _, section = hf_model_section(cfg.to_dict())
    ours = build_model(build_model_spec(section), device="meta")
    assert count(ours) == count(theirs)
