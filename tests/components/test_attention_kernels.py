"""Attention by composition: chunked attention, the weightless QK-norm, the score kernels (FlexAttention against
the explicit one) and a plug-in score rule written as a transform."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nanodecoder.api.catalog import REGISTERS
from nanodecoder.components.attention import CausalSelfAttention, visible
from nanodecoder.components.attention_kernels import SDPA, ByDevice, Explicit, Flex, Transform
from nanodecoder.config.declare import build, declared
from nanodecoder.config.registry import make_catalog
from nanodecoder.model import build_model
from nanodecoder.model.spec import build_model_spec

D = 32


def make(**params) -> CausalSelfAttention:
    """A float64 layer of 4 query and 2 key/value heads (unless ``params`` say otherwise), weights ~ N(0, 0.3)."""
    g = torch.Generator().manual_seed(0)
    attn = CausalSelfAttention(build(CausalSelfAttention.Spec, {"n_heads": 4, "n_kv_heads": 2, **params},
                                     ctx={"d_model": D}, kind="causal", impl=CausalSelfAttention)).double()
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3
    return attn


# ---------------------------------------------------------------------------------------------- chunked attention
def test_chunked_mask_is_transformers_llama4_chunked_causal_mask():
    """transformers builds Llama 4's chunked layers' mask as causal AND (kv // chunk == q // chunk)."""
    from transformers.masking_utils import and_masks, causal_mask_function, chunked_overlay
    T, chunk = 19, 5
    hf = and_masks(causal_mask_function, chunked_overlay(chunk, torch.zeros(1, dtype=torch.long)))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    want = hf(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q, k)
    torch.testing.assert_close(visible(torch.arange(T), torch.arange(T), None, chunk), want)
    both = visible(torch.arange(T), torch.arange(T), 3, chunk)           # a window inside the chunk as well
    assert torch.equal(both, want & (k > q - 3))


@torch.no_grad()
def chunked_reference(attn, x):
    """Query i over keys j <= i of its chunk, written out in float64 (no sinks, no cap, grouped heads)."""
    s = attn.spec
    E, H, K = s.head_size, s.n_heads, s.kv_heads
    q, k, v = (x @ attn.qkv.weight.double().T).split([H * E, K * E, K * E], dim=-1)
    n, t = x.shape[:2]
    q, k, v = q.reshape(n, t, H, E), k.reshape(n, t, K, E), v.reshape(n, t, K, E)
    out = torch.zeros(n, t, H, E, dtype=torch.float64)
    for i in range(t):
        js = [j for j in range(i + 1) if j // s.chunk == i // s.chunk]
        for h in range(H):
            scores = torch.stack([(q[:, i, h] * k[:, j, h // (H // K)]).sum(-1) for j in js], -1)
            w = (scores / math.sqrt(E)).softmax(-1)
            out[:, i, h] = sum(w[:, a, None] * v[:, j, h // (H // K)] for a, j in enumerate(js))
    return out.reshape(n, t, H * E) @ attn.out.weight.double().T


def test_chunked_attention_matches_its_formula_and_decodes_through_a_chunk_sized_cache():
    attn = make(chunk=3).eval()
    B, T = 2, 11
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = attn(x)
    torch.testing.assert_close(full, chunked_reference(attn, x), rtol=1e-9, atol=1e-10)
    cache = attn.new_cache(B, T, "cpu", torch.float64)
    assert cache.k.shape[2] == 3                                   # a chunked layer caches one chunk at most
    steps = [attn(x[:, :4], cache=cache)] + [attn(x[:, i:i + 1], cache=cache) for i in range(4, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("T,chunk,window", [(10, 3, None), (10, 3, 2), (9, 3, None), (4, 8, None), (17, 5, 4)])
def test_chunked_score_flops_and_cache_count_the_keys_each_query_sees(T, chunk, window):
    s = make(chunk=chunk, window=window).spec
    keys = visible(torch.arange(T), torch.arange(T), window, chunk).sum().item() / T
    assert s.score_flops(T) == pytest.approx(2 * s.n_heads * 2 * s.head_size * keys)
    assert s.cache_positions(T) == min(T, chunk, window or T)


# ---------------------------------------------------------------------------------------------- weightless QK-norm
@pytest.mark.parametrize("scope", ["head", "projection"])
def test_weightless_qk_norm_is_x_over_rms_and_has_no_parameter(scope):
    """Llama 4's L2 norm: x * rsqrt(mean(x^2) + eps), no learned weight."""
    attn = make(qk_norm=True, qk_norm_weight=False, qk_norm_scope=scope, qk_norm_eps=1e-5, bias=False)
    s = attn.spec
    assert attn.q_norm.weight is None and attn.k_norm.weight is None
    assert sum(p.numel() for p in attn.parameters()) == s.n_params == make(bias=False).spec.n_params
    assert not any("norm" in k for k in attn.state_dict())
    x = torch.randn(2, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    E, H, K = s.head_size, s.n_heads, s.kv_heads
    q, k, v = (x @ attn.qkv.weight.T).split([H * E, K * E, K * E], dim=-1)
    width = E if scope == "head" else None

    def l2(t):
        shaped = t.unflatten(-1, (-1, width)) if width else t
        normed = shaped * torch.rsqrt(shaped.pow(2).mean(-1, keepdim=True) + 1e-5)
        return normed.flatten(-2) if width else normed

    q, k = l2(q), l2(k)
    q, k, v = (t.unflatten(-1, (-1, E)).transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    probs = (q @ k.transpose(-1, -2) / math.sqrt(E)).masked_fill(~mask, float("-inf")).softmax(-1)
    want = (probs @ v).transpose(1, 2).flatten(-2) @ attn.out.weight.T
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)


def test_weightless_qk_norm_needs_qk_norm(tmp_path):
    from nanodecoder.api.blueprint import load_blueprint
    from nanodecoder.config import BlueprintError
    path = tmp_path / "bp.yaml"
    path.write_text("model:\n  vocab_size: 20\n  context_length: 8\n  d_model: 32\n  n_layers: 1\n  block:\n"
                    "    attention: {kind: causal, n_heads: 4, qk_norm_weight: false}\n    mlp: {kind: gelu}\n")
    with pytest.raises(BlueprintError) as e:
        load_blueprint(path)
    assert "model.block.attention.qk_norm_weight (line 7): qk_norm_weight: false needs qk_norm: true" \
        in e.value.render()


# ---------------------------------------------------------------------------------------------- a plug-in score rule
class Temperature(Transform):
    """q / t_h with a learned temperature per head: the division keeps q for t's gradient."""

    def __call__(self, attn, q, k, rotary):
        return q / attn.temperature.to(q.dtype).view(1, -1, 1, 1), k, 1.0

    def plan(self, ledger, spec):
        ledger.keep("q")
        ledger.replace("q")


class TemperatureAttention(CausalSelfAttention):
    """Causal attention with a per-head learned temperature: one transform, one parameter."""

    @declared
    class Spec(CausalSelfAttention.Spec):
        @property
        def n_params(self):
            return super().n_params + self.n_heads

        def transforms(self):
            return (*super().transforms(), Temperature())

    def __init__(self, spec):
        super().__init__(spec)
        self.temperature = nn.Parameter(torch.ones(spec.n_heads))

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.ones_(self.temperature)


class Unplanned(Temperature):
    def plan(self, ledger, spec):
        ledger.replace("q")                                      # forgets the q it keeps


class UnplannedAttention(TemperatureAttention):
    @declared
    class Spec(TemperatureAttention.Spec):
        def transforms(self):
            return (*CausalSelfAttention.Spec.transforms(self), Unplanned())


def saved_in_attention(model, idx, dtype=None) -> int:
    """Bytes of the distinct storages autograd saves inside the attention modules; parameters and buffers left out,
    and what the plan counts apart: autocast's weight copies and RoPE's cos and sin (shared by every layer)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, inside, counted = {}, [0], [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = t
            if inside[0]:
                counted[0] += t.untyped_storage().nbytes()
        return t

    hooks = [h for b in model.blocks for h in (
        b.attn.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)),
        b.attn.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        model(idx, idx)
    for h in hooks:
        h.remove()
    copies = sum(2 * p.numel() for b in model.blocks for p in b.attn.parameters() if p.dim() == 2) if dtype else 0
    spec = model.blocks[0].attn.spec
    rope = 2 * 4 * idx.shape[1] * spec.rotary_size // 2 if model.spec.positional.rotates_heads else 0
    return counted[0] - copies - rope


def planned_in_attention(spec, B, T, c):
    a = spec.block.attention.saved_bytes(T, c, "cpu", spec.positional.rotates_heads)
    return spec.n_layers * (B * (T * a.per_token + a.per_sequence) + a.per_batch)


def temperature_model(name, impl, rope=True, **attention):
    catalog = make_catalog(*REGISTERS, plugins=False)
    catalog["attention"].add(name, impl, origin="plug-in 'test'")
    raw = {"vocab_size": 40, "context_length": 16, "d_model": D, "n_layers": 2, "tie_embeddings": False,
           "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": name, "n_heads": 4, "n_kv_heads": 2,
                                                                 **attention}, "mlp": {"kind": "swiglu"}}}
    if rope:
        raw["positional"] = {"kind": "rope"}
    return build_model_spec(raw, catalog=catalog)


@pytest.mark.parametrize("attention", [{}, {"qk_norm": True}, {"window": 4, "sinks": True}],
                         ids=["fused", "qk-norm", "explicit"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "nope"])
def test_a_per_head_temperature_is_one_transform_and_plans_its_own_bytes(attention, rope):
    spec = temperature_model("temperature", TemperatureAttention, rope, **attention)
    model = build_model(spec, seed=0).train()
    assert sum(p.numel() for p in model.blocks[0].attn.parameters()) == spec.block.attention.n_params
    assert "blocks.0.attn.temperature" in model.state_dict()
    B, T = 4, 16
    idx = torch.randint(0, spec.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    for dtype, c in ((None, 4), (torch.bfloat16, 2)):
        assert planned_in_attention(spec, B, T, c) == pytest.approx(saved_in_attention(model, idx, dtype),
                                                                    rel=0.03), dtype
    out = model(idx, idx)
    out.loss.backward()
    assert all(b.attn.temperature.grad.abs().sum() > 0 for b in model.blocks)
    if attention.get("qk_norm"):
        return                                                # the norm undoes a scaled projection
    with torch.no_grad():                                     # a temperature t is q / t: scores divided by t
        for b in model.blocks:
            b.attn.temperature.fill_(2.0)
        warm = model(idx).logits
    plain = build_model(spec, seed=0).eval()
    with torch.no_grad():
        for b in plain.blocks:
            b.attn.qkv.weight[:b.attn.spec.widths["q"]] /= 2
        torch.testing.assert_close(plain(idx).logits, warm, rtol=1e-5, atol=1e-5)


def test_a_temperature_that_forgets_what_it_keeps_is_under_planned():
    spec = temperature_model("unplanned", UnplannedAttention)
    model = build_model(spec, seed=0).train()
    idx = torch.randint(0, spec.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    assert planned_in_attention(spec, 4, 16, 4) < 0.9 * saved_in_attention(model, idx)


# ---------------------------------------------------------------------------------------------- FlexAttention
FLEX_CASES = {"window": {"window": 5}, "chunk": {"chunk": 6}, "softcap": {"softcap": 2.0},
              "all": {"window": 7, "chunk": 16, "softcap": 3.0}}


def qkv(H=4, K=2, T=37, E=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, n, T, E, generator=g) * 1.5).requires_grad_(grad) for n in (H, K, K)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sinks"])
@pytest.mark.parametrize("mods", FLEX_CASES.values(), ids=list(FLEX_CASES))
def test_flex_kernel_equals_the_explicit_kernel(mods, sinks):
    """fp32 on the CPU, forward (torch has no FlexAttention backward on the CPU; the gradients are checked on
    CUDA below and through the sink rescale next)."""
    q, k, v = qkv()
    sink_H = torch.randn(4, generator=torch.Generator().manual_seed(9)) if sinks else None
    with torch.no_grad():
        want = Explicit(**mods)(q, k, v, None, 0.3, 0.0, sink_H)
        got = Flex(**mods, compiled=False)(q, k, v, None, 0.3, 0.0, sink_H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sinks_rescale_the_output_by_the_sigmoid_of_the_log_sum_exp_gradients_included():
    """softmax over keys and a sink s0: sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(s0)) = out * sigmoid(lse - s0), with
    out and lse those of the softmax over the keys alone (what FlexAttention returns)."""
    q, k, v = qkv(H=2, K=2, T=9, grad=True)
    sink_H = torch.randn(2, requires_grad=True)
    want = Explicit(window=4)(q, k, v, None, None, 0.0, sink_H)
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~visible(torch.arange(9), torch.arange(9), 4), float("-inf"))
    out, lse = scores.softmax(-1) @ v, scores.logsumexp(-1)
    got = out * torch.sigmoid(lse - sink_H.view(1, -1, 1)).unsqueeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    w = torch.randn_like(want)
    grads = [torch.autograd.grad((t * w).sum(), (q, k, v, sink_H)) for t in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sinks"])
@pytest.mark.parametrize("mods", FLEX_CASES.values(), ids=list(FLEX_CASES))
def test_flex_kernel_gradients_equal_the_explicit_kernels_on_cuda(mods, sinks):
    q, k, v = (t.cuda().requires_grad_() for t in qkv(T=300))
    sink_H = torch.randn(4, device="cuda", requires_grad=True) if sinks else None
    inputs = (q, k, v) + ((sink_H,) if sinks else ())
    want = Explicit(**mods)(q, k, v, None, 0.3, 0.0, sink_H)
    got = Flex(**mods)(q, k, v, None, 0.3, 0.0, sink_H)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_planner_reports_the_kernel_of_the_device_it_plans_for():
    spec = make(window=8, sinks=True, logit_softcap=30.0).spec
    assert spec.kernel_for("cpu") is Explicit and spec.kernel_for("cuda") is Flex
    assert make(window=8, dropout=0.1).spec.kernel_for("cuda") is Explicit          # flex has no dropout
    assert make().spec.kernel_for("cuda") is SDPA
    cpu, cuda = spec.saved_bytes(256, 2, "cpu", True), spec.saved_bytes(256, 2, "cuda", True)
    assert cpu.per_sequence > 0 and cpu.per_batch == 256 * 256
    assert cuda.per_sequence == cuda.per_batch == 0
    attn = make(window=8, sinks=True)
    assert isinstance(attn.kernel.inner, ByDevice)
    assert isinstance(attn.kernel.inner.on_cuda, Flex) and isinstance(attn.kernel.inner.other, Explicit)
