"""Gemma 3 (``gemma3_text``) against transformers itself: tiny random models, every tensor randomised (norm weights
too: Gemma's norms multiply by 1 + weight); local layers at RoPE theta 1e4 with a sliding window, global layers at
their own theta with linear scaling (a positional per layer), q/k norms, sandwich norms, scaled embeddings,
query_pre_attn_scalar other than head_dim, soft-caps."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.hf import FAMILIES, HFError, export_hf, import_hf  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402
from test_hf_families_more import assert_logits_match, save_random  # noqa: E402
from test_hf_interop import V, assert_same_greedy_tokens, hf_tokenizer_kind, ours_logits, write_tokenizer  # noqa: E402,F401

TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=3, layer_types=TYPES)
CONFIGS = {
    # Gemma-3-4B's RoPE: local 1e4, global 1e6 with linear scaling 8; query_pre_attn_scalar != head_dim
    "gemma3": dict(query_pre_attn_scalar=12, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
    # the final soft-cap, biases, untied head, one RoPE for both types; attn_logit_softcapping, which Gemma3Attention
    # never applies (Gemma 3 has no attention soft-cap): it must change nothing here either
    "capped": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_bias=True,
                   tie_word_embeddings=False, rope_parameters={
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


def save_tiny(config, folder):
    """transformers' model of ``config``, every parameter randomised (norm weights too), saved in ``folder``."""
    return save_random(config, folder)


def refusal(tmp_path, capsys, changes: dict) -> str:
    """The one line ``hf import`` prints for ``tmp_path/hf`` with ``changes`` made to its config.json (exit 2)."""
    f = tmp_path / "hf" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    capsys.readouterr()
    assert hf_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "run").exists()
    return err


def tiny(folder, name="gemma3", **changes):
    return save_tiny(transformers.Gemma3TextConfig(**{**BASE, **CONFIGS[name], **changes}), folder)


def imported(tmp_path, folder="hf"):
    run = import_hf(tmp_path / folder, tmp_path / "run")
    return load_run_model(run.path)[0], run


IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers(tmp_path, name):
    hf = tiny(tmp_path / "hf", name)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    model, run = imported(tmp_path)
    assert_logits_match(hf, model, IDX)                      # the full forward and token by token through the cache
    assert_same_greedy_tokens(hf, model, IDX[:1, :4])
    spec = model.spec
    assert [b.attention.window for b in spec.blocks] == [3, 3, None, 3]
    assert (spec.norm_placement, spec.embed_scale) == ("sandwich", True)
    if name == "gemma3":      # the global layer has a RoPE of its own; the local ones the model's
        thetas = [(b.positional.theta, b.positional.scaling) for b in spec.blocks]
        assert thetas[0] == thetas[1] == thetas[3] == (1e4, None)
        assert thetas[2][0] == 1e6 and (thetas[2][1].kind, thetas[2][1].factor) == ("linear", 8.0)
        (override,) = yaml.safe_load((run.path / "blueprint.yaml").read_text())["model"]["overrides"]
        assert override["layers"] == [2] and "window" not in override["attention"]
        assert override["positional"] == {"kind": "rope", "theta": 1e6, "scaling": {"kind": "linear", "factor": 8.0}}
    else:
        assert spec.logit_softcap == 30.0 and spec.blocks[0].attention.logit_softcap is None
        assert not spec.overrides[0].positional                 # both types share one RoPE: no positional override


def exported(tmp_path, run, hf):
    """``hf export`` of ``run`` loaded back by transformers (every tensor used, the tensors ``save_pretrained`` of
    ``hf`` wrote), with ``hf``'s logits; its config."""
    assert hf_main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert (back.eval()(IDX).logits - hf(IDX).logits).abs().max().item() <= 1e-4
    written, saved = (set(load_file(tmp_path / d / "model.safetensors")) for d in ("out", "hf"))
    assert written == saved
    return back.config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers(tmp_path, name):
    hf = tiny(tmp_path / "hf", name)
    config = exported(tmp_path, imported(tmp_path)[1], hf)
    assert config.model_type == "gemma3_text" and config.layer_types == TYPES
    assert config.rope_parameters == hf.config.rope_parameters


def test_legacy_rope_keys_and_sliding_window_pattern(tmp_path):
    """A transformers 4.x config.json: rope_theta + rope_scaling for the global layers, rope_local_base_freq for the
    local ones, sliding_window_pattern instead of layer_types."""
    hf = tiny(tmp_path / "hf", layer_types=None, sliding_window_pattern=3)
    f = tmp_path / "hf" / "config.json"
    config = json.loads(f.read_text())
    config.pop("rope_parameters"), config.pop("layer_types")
    config.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  sliding_window_pattern=3)
    f.write_text(json.dumps(config))
    read = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert read.rope_parameters == hf.config.rope_parameters and read.layer_types == hf.config.layer_types
    assert hf.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model, _ = imported(tmp_path)
    assert_logits_match(hf, model, IDX)


def test_defaults_are_those_of_transformers():
    declared = {f.name: f.default for f in dataclasses.fields(transformers.Gemma3TextConfig)}
    for key, ours in FAMILIES["gemma3_text"].defaults.items():
        assert declared[key] == ours, key
    assert transformers.Gemma3TextConfig.default_theta == {"global": 1e6, "local": 1e4}


@pytest.mark.parametrize("changes, message", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention true is not implemented"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not implemented"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "sliding_attention"]},
     "layer type 'chunked_attention' is not implemented for gemma3_text"),
])
def test_refusals_are_one_clear_line(tmp_path, capsys, changes, message):
    tiny(tmp_path / "hf")
    assert message in refusal(tmp_path, capsys, changes)


def test_a_blueprint_with_a_positional_per_layer_exports_to_gemma3_only(tmp_path):
    """Written by hand (Gemma 3's layout), it exports to gemma3_text; a NoPE layer has no family, and the refusal says
    which layer's positional differs."""
    attn = {"kind": "causal", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "qk_norm": True}
    raw = {"vocab_size": V, "context_length": 64, "d_model": 32, "n_layers": 3, "embed_scale": True,
           "norm_placement": "sandwich", "positional": {"kind": "rope", "theta": 1e4}, "tie_embeddings": True,
           "block": {"norm": {"kind": "rmsnorm"}, "attention": {**attn, "window": 4},
                     "mlp": {"kind": "geglu", "hidden_size": 48}},
           "overrides": [{"layers": [2], "attention": attn,
                          "positional": {"kind": "rope", "theta": 1e6, "scaling": {"kind": "linear", "factor": 8.0}}}]}
    model = build_model(build_model_spec(raw), seed=0).eval()
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    with torch.no_grad():
        assert (back(IDX).logits - ours_logits(model, IDX)).abs().max().item() <= 1e-4
    nope = {**raw, "overrides": [*raw["overrides"], {"layers": [1], "positional": {"kind": "none"}}]}
    with pytest.raises(HFError, match="closest: gemma3_text .*layer 1 has positional kind 'none'"):
        export_hf(build_model(build_model_spec(nope)), None, tmp_path / "nope", hint="gemma3_text")
