"""Llama 4 (``llama4_text``) against transformers itself: tiny random models, every tensor randomised.  NoPE
layers (a positional per layer), chunked attention on the RoPE layers, the weightless L2 q/k norm, interleaved RoPE
pairs, llama3 RoPE scaling with equal low and high frequency factors, MoE layers (sigmoid top-k router scaling the
experts' inputs, one shared expert) among dense ones; what it cannot express is refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.hf import FAMILIES, export_hf, import_hf  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402
from test_hf_families_more import assert_logits_match  # noqa: E402
from test_hf_gemma3 import exported, refusal, save_tiny  # noqa: E402
from test_hf_interop import V, assert_same_greedy_tokens, hf_tokenizer_kind, ours_logits  # noqa: E402,F401

BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            attention_chunk_size=5, moe_layers=[])
CONFIGS = {
    # layer 3 NoPE (the default interval 4), the others chunked with the L2 q/k norm; Llama 4's published scaling
    "llama4": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                    "original_max_position_embeddings": 16}),
    # NoPE first, biases, no q/k norm, tied head, plain RoPE
    "nope_first": dict(no_rope_layers=[0, 1, 1, 0], use_qk_norm=False, attention_bias=True, tie_word_embeddings=True),
    # Maverick-style: every 2nd layer (1, 3) an MoE, top-1 (Scout and Maverick route to one expert)
    "moe_interleaved_top1": dict(moe_layers=None, interleave_moe_layer_step=2, num_local_experts=4,
                                 num_experts_per_tok=1),
    # the first layer an MoE (the base block of ours), layer 2 dense; top-2
    "moe_top2": dict(moe_layers=[0, 1, 3], num_local_experts=4, num_experts_per_tok=2),
    # the NoPE layers' query temperature from position floor_scale - 1 = 3 on (8191 in the published models)
    "temperature_tuning": dict(no_rope_layers=[1, 0, 1, 0], floor_scale=4, attn_scale=0.3),
}


def tiny(folder, name="llama4", **changes):
    return save_tiny(transformers.Llama4TextConfig(**{**BASE, **CONFIGS[name], **changes}), folder)


def imported(tmp_path):
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    return load_run_model(run.path)[0], run


IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers(tmp_path, name):
    hf = tiny(tmp_path / "hf", name)
    model, _ = imported(tmp_path)
    assert_logits_match(hf, model, IDX)                      # the full forward and token by token through the cache
    assert_same_greedy_tokens(hf, model, IDX[:1, :4])
    rope = hf.config.no_rope_layers
    spec = model.spec
    assert [b.positional.kind for b in spec.blocks] == ["rope" if r else "none" for r in rope]
    assert [b.attention.chunk for b in spec.blocks] == [5 if r else None for r in rope]
    assert [b.attention.qk_norm for b in spec.blocks] == [bool(r and hf.config.use_qk_norm) for r in rope]
    assert not any(b.attention.qk_norm_weight and b.attention.qk_norm for b in spec.blocks)
    assert [i for i, b in enumerate(spec.blocks) if b.mlp.kind == "moe"] == hf.config.moe_layers
    for b in spec.blocks:
        m = b.mlp
        if m.kind == "moe":
            assert (m.n_experts, m.top_k, m.hidden, m.n_shared_experts) == (4, hf.config.num_experts_per_tok, 16, 1)
            assert m.weight_input and m.router.kind == "sigmoid_topk"
        else:
            assert m.hidden == 48                                          # intermediate_size_mlp


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers(tmp_path, name):
    hf = tiny(tmp_path / "hf", name)
    config = exported(tmp_path, imported(tmp_path)[1], hf)
    assert config.model_type == "llama4_text"
    keys = ("no_rope_layers", "layer_types", "attention_chunk_size", "use_qk_norm", "rope_parameters", "moe_layers")
    if hf.config.moe_layers:
        keys += ("num_local_experts", "num_experts_per_tok", "intermediate_size")
    for key in keys:
        assert getattr(config, key) == getattr(hf.config, key), key


def test_a_hand_written_blueprint_exports_to_llama4(tmp_path):
    """NoPE layers, chunked attention and the weightless q/k norm written in a blueprint pick the llama4_text family
    (no other family has them)."""
    attn = {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}
    raw = {"vocab_size": V, "context_length": 64, "d_model": 32, "n_layers": 4, "tie_embeddings": False,
           "positional": {"kind": "rope", "theta": 500000.0},
           "block": {"norm": {"kind": "rmsnorm", "eps": 1e-5},
                     "attention": {**attn, "chunk": 6, "qk_norm": True, "qk_norm_weight": False, "qk_norm_eps": 1e-5},
                     "mlp": {"kind": "swiglu", "hidden_size": 48}},
           "overrides": [{"layers": {"start": 1, "every": 2}, "attention": attn, "positional": {"kind": "none"}}]}
    model = build_model(build_model_spec(raw), seed=0).eval()
    out = tmp_path / "out"
    export_hf(model, None, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.no_rope_layers == [1, 0, 1, 0] and back.config.attention_chunk_size == 6
    assert back.config.layer_types == ["chunked_attention", "full_attention"] * 2
    with torch.no_grad():
        assert (back(IDX).logits - ours_logits(model, IDX)).abs().max().item() <= 1e-4


def test_a_hand_written_moe_blueprint_exports_to_llama4(tmp_path):
    """Llama 4's MoE written in a blueprint (sigmoid_topk router, weight_input, one shared expert) over dense layers
    picks the llama4_text family; transformers computes what we do, and the weights route as ours."""
    moe = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 16, "n_shared_experts": 1,
           "weight_input": True, "router": {"kind": "sigmoid_topk"}}
    raw = {"vocab_size": V, "context_length": 64, "d_model": 32, "n_layers": 3, "tie_embeddings": False,
           "positional": {"kind": "rope", "theta": 500000.0},
           "block": {"norm": {"kind": "rmsnorm", "eps": 1e-5}, "attention": {"kind": "causal", "n_heads": 4},
                     "mlp": {"kind": "swiglu", "hidden_size": 48}},
           "overrides": [{"layers": [0, 2], "mlp": moe}]}
    model = build_model(build_model_spec(raw), seed=0).eval()
    with torch.no_grad():                        # the shared and routed experts differ, the router is not uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "out"
    export_hf(model, None, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.model_type == "llama4_text" and back.config.moe_layers == [0, 2]
    assert (back.config.intermediate_size, back.config.intermediate_size_mlp) == (16, 48)
    with torch.no_grad():
        assert (back(IDX).logits - ours_logits(model, IDX)).abs().max().item() <= 1e-4


def test_weighing_the_outputs_is_another_model(tmp_path):
    """The check that the input scaling matters: the same weights with the router's weights applied to the
    experts' outputs (our default) give other logits than transformers'."""
    hf = tiny(tmp_path / "hf", "moe_interleaved_top1")
    model, _ = imported(tmp_path)
    assert_logits_match(hf, model, IDX)
    for b in model.blocks:
        if b.mlp.spec.kind == "moe":
            b.mlp.spec = dataclasses.replace(b.mlp.spec, weight_input=False)
    with torch.no_grad():
        assert (ours_logits(model, IDX) - hf(IDX).logits).abs().max().item() > 1e-3


def test_defaults_are_those_of_transformers():
    cls = transformers.Llama4TextConfig
    declared = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, ours in FAMILIES["llama4_text"].defaults.items():
        assert (cls.default_theta if key == "rope_theta" else declared[key]) == ours, key


@pytest.mark.parametrize("changes, message", [
    # transformers cannot derive the MoE layers either (a range with step 0)
    ({"moe_layers": None, "interleave_moe_layer_step": 0}, "interleave_moe_layer_step 0 must be >= 1"),
    ({"attention_chunk_size": None}, "attention_chunk_size is null"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented"),
])
def test_refusals_are_one_clear_line(tmp_path, capsys, changes, message):
    tiny(tmp_path / "hf")
    assert message in refusal(tmp_path, capsys, changes)


def test_temperature_tuning_below_floor_scale_changes_nothing(tmp_path):
    """With the whole context below floor_scale - 1 the NoPE layers' query scale is 1 at every position: the
    config.json's attn_temperature_tuning true is then the same model, imported exactly."""
    hf = tiny(tmp_path / "hf", floor_scale=65)
    assert hf.config.attn_temperature_tuning and not all(hf.config.no_rope_layers)
    model, _ = imported(tmp_path)
    assert_logits_match(hf, model, IDX)


def test_the_query_temperature_is_llama4s_formula_and_differs_from_none(tmp_path):
    """Our NoPE layers scale q by 1 + attn_scale * ln(1 + floor((t + 1) / floor_scale)); without it the imported
    model is another one (so the parity above depends on it)."""
    from nanodecoder.components.attention_kernels import QueryTemperature
    q = torch.randn(2, 3, 10, 4)
    got, _, _ = QueryTemperature(4, 0.3)(None, q, q, None, start=5)
    t = torch.arange(5, 15, dtype=torch.float64)
    want = q.double() * (1 + 0.3 * torch.log(1 + torch.floor((t + 1) / 4))).view(-1, 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    hf = tiny(tmp_path / "hf", "temperature_tuning")
    model, _ = imported(tmp_path)
    assert {b.attn.spec.query_scale_floor for b, r in zip(model.blocks, hf.config.no_rope_layers)
            if not r} == {4}
    hf.config.attn_temperature_tuning = False        # transformers reads it at construction: a second model
    off = type(hf)(hf.config).eval()
    off.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (off(IDX).logits - ours_logits(model, IDX)).abs().max() > 1e-3
