"""The analytic plan (model/plan.py) against hand computations and measurements of built models.

Tolerances: parameter rows and matmul FLOPs exact; activation bytes within 3% of what autograd actually saves
(measured with saved_tensors_hooks, storages counted once, parameters left out) on the CPU kernels.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from nanodecoder.cli.blueprint import blueprint_model_spec
from nanodecoder.model import build_model
from nanodecoder.components.contracts import mean_keys
from nanodecoder.model import plan as P
from nanodecoder.model.params import count_blueprint
from nanodecoder.model.spec import build_model_spec
from nanodecoder.resources import blueprints_dir
from nanodecoder.runtime.core import checkpoint_blocks

BASE = {"vocab_size": 96, "context_length": 64, "d_model": 64, "n_layers": 2, "tie_embeddings": False}
#: architectures covering every path the activation estimate distinguishes
CASES = {
    "gpt2": "{block: {attention: {kind: causal, n_heads: 4}, mlp: {kind: gelu}}}",
    "post-norm, biases": "{norm_placement: post, block: {attention: {kind: causal, n_heads: 4, bias: true}, "
                         "mlp: {kind: relu2, bias: true}}}",
    "llama (GQA, RoPE)": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, "
                         "n_heads: 8, n_kv_heads: 2}, mlp: {kind: swiglu}}}",
    "MHA with RoPE": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, "
                     "n_heads: 4}, mlp: {kind: gelu}}}",
    "qk-norm": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, n_heads: 4, "
               "n_kv_heads: 2, qk_norm: true}, mlp: {kind: swiglu}}}",
    "moe + shared": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, "
                    "n_heads: 4, n_kv_heads: 2}, mlp: {kind: moe, n_experts: 8, top_k: 2, expert_hidden: 96, "
                    "n_shared_experts: 1}}}",
    "gemma-like": "{positional: {kind: rope}, norm_placement: sandwich, logit_softcap: 30.0, block: {norm: "
                  "{kind: rmsnorm}, attention: {kind: causal, n_heads: 4, n_kv_heads: 2, logit_softcap: 50.0, "
                  "window: 16}, mlp: {kind: geglu}}, overrides: [{layers: [1], attention: {kind: causal, "
                  "n_heads: 4, n_kv_heads: 2, logit_softcap: 50.0}}]}",
    "gpt-oss-like": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, "
                    "n_heads: 8, n_kv_heads: 2, sinks: true, bias: true, window: 16}, mlp: {kind: moe, "
                    "n_experts: 8, top_k: 2, expert_kind: swiglu_clamped, expert_hidden: 64, bias: true, "
                    "router: {kind: topk, bias: true}}}}",
    "MLA (math path on the CPU)": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: mla, "
                                  "n_heads: 4, q_lora_rank: 48, kv_lora_rank: 32, qk_nope_head_dim: 16, "
                                  "qk_rope_head_dim: 8, v_head_dim: 16}, mlp: {kind: swiglu}}}",
    "MLA without a query latent": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: "
                                  "mla, n_heads: 4, kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, "
                                  "v_head_dim: 24}, mlp: {kind: gelu}}}",
    # layer 1 without RoPE (NoPE): its q is a view of the qkv projection, no rotated copy
    "per-layer positional": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, attention: {kind: causal, "
                            "n_heads: 4, n_kv_heads: 2}, mlp: {kind: swiglu}}, overrides: [{layers: [1], "
                            "positional: {kind: none}}]}",
    "window (SDPA mask)": "{block: {attention: {kind: causal, n_heads: 4, window: 8}, mlp: {kind: gelu}}}",
    "dropout": "{dropout: 0.1, block: {attention: {kind: causal, n_heads: 4, dropout: 0.1}, "
               "mlp: {kind: gelu, dropout: 0.1}}}",
    "chunked, weightless qk-norm (llama-4-like)": "{positional: {kind: rope}, block: {norm: {kind: rmsnorm}, "
                                                  "attention: {kind: causal, n_heads: 4, n_kv_heads: 2, chunk: 16, "
                                                  "qk_norm: true, qk_norm_weight: false}, mlp: {kind: swiglu}}, "
                                                  "overrides: [{layers: [1], attention: {kind: causal, n_heads: 4, "
                                                  "n_kv_heads: 2}}]}",
    "projection qk-norm, partial biases": "{block: {norm: {kind: rmsnorm}, attention: {kind: causal, n_heads: 4, "
                                          "bias: [k, v], qk_norm: true, qk_norm_scope: projection}, "
                                          "mlp: {kind: gelu}}}",
}


def spec_of(case: str, **changes):
    raw = {**BASE, **yaml.safe_load(CASES[case]), **changes}
    return build_model_spec(raw)


def saved_bytes(model, idx, dtype=None) -> int:
    """Bytes of the distinct storages autograd saves in a training forward (parameters and buffers left out)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(idx, idx)
    return sum(seen.values())


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", sorted(p.name for p in blueprints_dir().glob("*.yaml")))
def test_analytic_rows_are_the_rows_of_the_built_model(name):
    _, spec = blueprint_model_spec(name, vocab_size=256)
    analytic, built = P.param_report(spec), count_blueprint(spec)
    assert [(r.name, r.count, round(r.active)) for r in analytic.rows] == \
        [(r.name, r.count, round(r.active)) for r in built.rows]
    assert (analytic.total, analytic.active, analytic.embedding) == (built.total, built.active, built.embedding)


# ------------------------------------------------------------------------------------ FLOPs
def test_flops_of_a_tiny_model_by_hand():
    spec = spec_of("gpt2", tie_embeddings=True)            # d 64, 2 layers, 4 heads of 16, gelu 256, vocab 96
    T = 32
    f = P.flops(spec, T)
    per_block = 2 * (4 * 64 * 64 + 2 * 64 * 256)           # qkv + out, up + down (no biases)
    attention = 2 * 4 * (16 + 16) * (T + 1) / 2            # q.k and p.v over (T+1)/2 keys on average
    assert f.block_matmuls == 2 * per_block
    assert f.head == 2 * 64 * 96                           # the tied head is a matmul too
    assert f.attention == 2 * attention
    assert f.forward == 2 * per_block + 2 * 64 * 96 + 2 * attention
    assert f.training == 3 * f.forward
    assert f.recompute == f.forward - f.head
    assert P.flops_per_token(spec, T) == f.training
    assert P.flops_per_token(build_model(spec, device="meta"), T) == f.training


def test_mean_keys_averages_the_causal_window():
    for T, window in [(1, None), (10, None), (10, 3), (10, 10), (10, 30), (7, 1)]:
        brute = sum(min(t + 1, window or T) for t in range(T)) / T
        assert mean_keys(T, window) == pytest.approx(brute)


@pytest.mark.parametrize("case", ["gpt2", "moe + shared", "window (SDPA mask)", "gemma-like"])
def test_matmul_flops_equal_torch_flop_counter(case):
    """FlopCounterMode counts the weight matmuls exactly as the plan does (routed experts: k per token,
    dropless). For attention it counts what runs: the T x T products of our explicit path and of the CPU math
    path (the fused CPU kernel is not counted at all), where the plan counts the causal keys only."""
    spec = spec_of(case, tie_embeddings=True)
    if case == "moe + shared":
        spec = dataclasses.replace(spec, block=dataclasses.replace(
            spec.block, mlp=dataclasses.replace(spec.block.mlp, dispatch="loop")))   # mm per expert: counted
    torch.manual_seed(0)
    model = build_model(spec).train()
    B, T = 2, 32
    idx = torch.randint(0, spec.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    f = P.flops(spec, T)
    assert counts["aten.mm"] == (f.block_matmuls + f.head) * B * T
    square = sum(4 * b.attention.n_heads * b.attention.score_dim * T * T * B for b in spec.blocks
                 if b.attention.window is not None or not b.attention.fused)
    assert counts.get("aten.bmm", 0) == square


# ------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_saves(case, precision):
    if case == "dropout" and precision == "bf16":
        pytest.skip("the CPU math path of attention dropout upcasts part of its work under bf16 (5% off)")
    spec = spec_of(case)
    torch.manual_seed(0)
    model = build_model(spec).train()
    B, T = 3, 64
    measured = saved_bytes(model, torch.randint(0, spec.vocab_size, (B, T)),
                           torch.bfloat16 if precision == "bf16" else None)
    p = P.plan(spec, P.Setting(context=T, batch=B, precision=precision, device="cpu"))
    estimated = p.acts.saved + p.memory(False).weight_copies        # autocast's weight casts are saved too
    assert estimated == pytest.approx(measured, rel=0.03)


def test_with_checkpointing_each_block_keeps_only_its_input():
    spec = spec_of("llama (GQA, RoPE)", n_layers=3)
    model = build_model(spec).train()
    checkpoint_blocks(model)                    # what the runtime does with activation_checkpointing
    B, T = 3, 64
    measured = saved_bytes(model, torch.randint(0, spec.vocab_size, (B, T)))
    a = P.activations(spec, T, B, "fp32", "cpu")
    assert measured == pytest.approx(a.embedding + a.block_inputs + a.head, rel=0.01)
    assert a.total(True) == a.embedding + a.block_inputs + a.largest_block + a.head + a.logits
    assert a.total(True) < a.total(False)


def test_fused_attention_keeps_no_square_matrix_but_the_explicit_path_does():
    """Per token, plain causal attention (SDPA's fused kernel) costs the same at any context, and so do windows,
    sinks and soft-capping on CUDA (FlexAttention); on the CPU those take the explicit kernel, which keeps [T, T]
    probabilities: its cost per token grows with T."""
    def per_token(case, T, device):
        return P.activations(spec_of(case, context_length=T), T, 1, "bf16", device).blocks / T
    for device in ("cpu", "cuda"):
        assert per_token("gpt2", 1024, device) == per_token("gpt2", 64, device)
    for case in ("window (SDPA mask)", "gemma-like", "gpt-oss-like"):
        heads = spec_of(case).block.attention.n_heads
        grown = per_token(case, 1024, "cpu") - per_token(case, 64, "cpu")
        assert grown > heads * (1024 - 64) * 2           # bf16 probabilities of every layer (MoE padding aside)
        flex = per_token(case, 1024, "cuda") - per_token(case, 64, "cuda")
        assert abs(flex) < 0.01 * grown


# ------------------------------------------------------------------------------------ memory
def test_model_state_bytes_follow_precision_optimizer_and_sharding():
    spec = spec_of("moe + shared")
    n = P.param_report(spec).total
    fp32 = P.plan(spec, P.Setting(context=64)).memory()
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.weight_copies) == (4 * n, 4 * n, 8 * n, 0)
    bf16 = P.plan(spec, P.Setting(context=64, precision="bf16")).memory()
    matmul = n - P.param_report(spec).embedding - sum(2 * b.norm.n_params + b.mlp.router.n_params
                                                      for b in spec.blocks) - spec.final.n_params  # + the head
    assert bf16.weight_copies == 2 * matmul                 # norms, embeddings and the fp32 router are not cast
    assert bf16.activations < fp32.activations
    fsdp = P.plan(spec, P.Setting(context=64, world_size=8, sharded=True)).memory()
    assert fsdp.weights == 4 * n / 8 and fsdp.optimizer == 8 * n / 8 and fsdp.gathered > 0
    ddp = P.plan(spec, P.Setting(context=64, world_size=8)).memory()
    assert ddp.weights == 4 * n and ddp.gathered == 0


def test_kv_cache_counts_cache_width_and_windows():
    spec = spec_of("gemma-like", context_length=64)     # layer 0 windowed (16), layer 1 global; 2 KV heads of 16
    p = P.plan(spec, P.Setting(context=64, precision="bf16"))
    width = 2 * 2 * 16
    assert p.kv_cache_per_token == 2 * width * 2
    assert p.kv_cache_per_sequence == (16 + 64) * width * 2


def test_planning_deepseek_v3_builds_nothing(monkeypatch):
    """671B parameters + the 11.6B MTP module, 37B active without the input embedding: planned from the spec, no
    module built."""
    import nanodecoder.model.decoder as decoder

    def refuse(*args, **kwargs):
        raise AssertionError("a module was built")
    monkeypatch.setattr(decoder.Decoder, "__init__", refuse)
    _, spec = blueprint_model_spec("zoo/deepseek_v3")
    p = P.plan(spec, P.Setting(context=4096, precision="bf16", world_size=256, sharded=True))
    assert round(p.params.total / 1e9) == 683 and round(p.params.active_non_embedding / 1e9) == 37
    assert p.memory().weights == 4 * p.params.total / 256
    assert p.kv_cache_per_token == 61 * (512 + 64) * 2                 # MLA caches the latent and the rope key
