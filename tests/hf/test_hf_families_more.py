"""GPT-OSS, DeepSeek-V3 and YaRN RoPE against transformers itself: tiny random models, every tensor randomised."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.hf import import_hf  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402

from test_hf_interop import (assert_same_greedy_tokens, hf_tokenizer_kind, ours_logits,  # noqa: E402,F401
                              router_indices, write_tokenizer)

V = 96
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}


def _deepseek(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, max_position_embeddings=1024,
                rope_interleave=True)
    return transformers.DeepseekV3Config(**{**base, **kw})


CONFIGS = {
    # sliding / full / sliding layers, sinks, biases, yarn without truncation (the band edges are fractional here)
    "gpt_oss": lambda: transformers.GptOssConfig(
        vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=1024, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={**YARN, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}),
    # q_lora_rank, group-limited routing, yarn with mscale (cos/sin) and mscale_all_dim (softmax temperature)
    "deepseek_v3": lambda: _deepseek(
        q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, rope_parameters={**YARN, "mscale": 0.8, "mscale_all_dim": 1.0}),
    # q_proj straight from the input, biases on the down/out projections, two shared experts, plain RoPE
    "deepseek_v3_no_q_lora": lambda: _deepseek(
        q_lora_rank=None, attention_bias=True, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=2, routed_scaling_factor=1.5),
    "deepseek_v3_half_rope": lambda: _deepseek(
        q_lora_rank=24, rope_interleave=False, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
        n_shared_experts=1),
    # yarn in the llama-shaped families: mscale/mscale_all_dim only scale cos and sin there
    "llama_yarn": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "qwen3_yarn": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_parameters={**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "attention_factor": 1.3}),
}
MODEL_TYPE = {"gpt_oss": "gpt_oss", "llama_yarn": "llama", "qwen3_yarn": "qwen3"}


def tiny_hf(name, folder, seed=0):
    return save_random(CONFIGS[name](), folder, seed)


def save_random(config, folder, seed=0):
    """transformers' model of ``config``, every parameter and state buffer randomised, saved in ``folder``."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():       # HF starts norms at 1, biases, sinks and balancing biases at 0: that would hide swaps
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for n, b in hf.named_buffers():
            if n in hf.state_dict() and b.is_floating_point():
                b.copy_(torch.randn_like(b) * 0.5)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder)
    write_tokenizer(folder)
    return hf


def imported(tmp_path, name):
    hf = tiny_hf(name, tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, _, _ = load_run_model(run.path)
    return hf, model, run


def hf_routers(hf):
    """The router module of each MoE layer and the (weights, indices) positions of its output."""
    out = {}
    for k, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "router"):            # GPT-OSS: (logits, scores [N, k], indices [N, k])
            out[k] = layer.mlp.router
        elif hasattr(layer.mlp, "gate"):            # DeepSeek-V3: (logits, weights [N, k], indices [N, k])
            out[k] = layer.mlp.gate
    return out


def by_expert(indices, weights):
    order = indices.argsort(-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def assert_logits_match(hf, model, idx):
    with torch.no_grad():
        want = hf(idx).logits
        assert (ours_logits(model, idx) - want).abs().max().item() <= 1e-4
        cache = model.new_kv_cache(idx.size(0), 16)       # token by token through our KV cache
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache).logits for t in range(idx.size(1))], dim=1)
        assert (steps - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers(tmp_path, name):
    hf, model, run = imported(tmp_path, name)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 12))
    assert_logits_match(hf, model, idx)
    routers = hf_routers(hf)
    if routers:                                  # the same experts, with the same weights, for every token
        seen, hooks = router_indices(model)
        weights = {}
        hooks += [b.mlp.router.register_forward_hook(lambda m, i, o, k=k: weights.update({k: o.weights}))
                  for k, b in enumerate(model.blocks) if hasattr(b.mlp, "router")]
        theirs = {}
        hooks += [r.register_forward_hook(lambda m, i, o, k=k: theirs.update({k: (o[2], o[1])}))
                  for k, r in routers.items()]
        with torch.no_grad():
            model(idx), hf(idx)
        for h in hooks:
            h.remove()
        assert sorted(seen) == sorted(theirs) == sorted(routers)
        for k in seen:
            ours_i, ours_w = by_expert(seen[k][0], weights[k])
            hf_i, hf_w = by_expert(*theirs[k])
            assert torch.equal(ours_i, hf_i)
            assert torch.allclose(ours_w.float(), hf_w.float(), atol=1e-5)
    assert_same_greedy_tokens(hf, model, idx[:1, :4])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers(tmp_path, name):
    hf, model, run = imported(tmp_path, name)
    assert hf_main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.model_type == MODEL_TYPE.get(name, "deepseek_v3")
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert (back.eval()(idx).logits - ours_logits(model, idx)).abs().max().item() <= 1e-4
    written, saved = (set(load_file(tmp_path / d / "model.safetensors")) for d in ("out", "hf"))
    assert written == saved                      # the layout save_pretrained writes


def test_deepseek_fused_experts_on_disk(tmp_path):
    """transformers 5's in-memory layout (``experts.gate_up_proj`` [E, 2I, D], ``experts.down_proj`` [E, D, I])
    written straight to safetensors imports to the same model."""
    hf = tiny_hf("deepseek_v3", tmp_path / "hf")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 32, 32)
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        (fused / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    run = import_hf(fused, tmp_path / "run")
    model, _, _, _ = load_run_model(run.path)
    assert_logits_match(hf, model, torch.randint(0, V, (2, 12)))


def test_deepseek_multi_token_prediction_layer_is_skipped(tmp_path, capsys):
    """The MTP layer after the last one (``num_nextn_predict_layers``) is not part of the causal LM; transformers
    does not load it either.  A tensor of any other layer is still refused."""
    hf = tiny_hf("deepseek_v3", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    save_file({**tensors, "model.layers.3.eh_proj.weight": torch.zeros(32, 64)}, f, metadata={"format": "pt"})
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, _, _, _ = load_run_model(run.path)
    assert_logits_match(hf, model, torch.randint(0, V, (1, 8)))
    save_file({**tensors, "model.layers.4.eh_proj.weight": torch.zeros(32, 64)}, f, metadata={"format": "pt"})
    capsys.readouterr()
    assert hf_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run2")]) == 2
    assert "model.layers.4.eh_proj.weight not used" in capsys.readouterr().err


@pytest.mark.parametrize("name, changes, message", [
    ("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}, "quant_method 'mxfp4'"),
    ("gpt_oss", {"swiglu_limit": 5.0}, "swiglu_limit 5.0 is not implemented"),
    ("gpt_oss", {"layer_types": ["chunked_attention", "full_attention", "sliding_attention"]},
     "layer type 'chunked_attention' is not implemented for gpt_oss"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob false is not implemented"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads 2 differs"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not implemented"),
    ("llama_yarn", {"rope_parameters": {**YARN, "beta_fast": "fast"}}, "rope_parameters.beta_fast 'fast'"),
])
def test_refusals_are_one_clear_line(tmp_path, capsys, name, changes, message):
    d = tmp_path / "hf"
    tiny_hf(name, d)
    f = d / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    capsys.readouterr()
    assert hf_main(["import", str(d), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_yarn_softmax_temperature_is_not_exported_to_llama(tmp_path):
    """Our yarn with mscale_all_dim scales the softmax; transformers' llama would not: no family but DeepSeek's."""
    from nanodecoder.hf import HFError, export_hf
    from nanodecoder.model import build_model, build_model_spec
    base = {"vocab_size": V, "context_length": 32, "d_model": 32, "n_layers": 1, "tie_embeddings": False,
            "positional": {"kind": "rope", "scaling": {"kind": "yarn", "factor": 4.0, "mscale": 1.0,
                                                       "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}},
            "block": {"norm": {"kind": "rmsnorm", "eps": 1e-5}, "attention": {"kind": "causal", "n_heads": 4},
                      "mlp": {"kind": "swiglu"}}}
    with pytest.raises(HFError, match="mscale_all_dim"):
        export_hf(build_model(build_model_spec(base)), None, tmp_path / "out", hint="llama")
