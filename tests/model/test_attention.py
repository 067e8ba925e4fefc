"""Causal attention against a naive float64 reference, and causality by perturbation."""
import math

import pytest
import torch

from nanodecoder.components.attention import CausalSelfAttention, LayerKVCache
from nanodecoder.config.declare import build
from nanodecoder.components.positional import RoPE

D, T, B = 32, 7, 2


def make(n_heads, n_kv_heads, qk_norm=False, bias=True):
    return make_variant(n_heads=n_heads, n_kv_heads=n_kv_heads, qk_norm=qk_norm, bias=bias)


def rope_for(head_dim, theta=10000.0):
    return RoPE(RoPE.Spec(kind="rope", impl=RoPE, theta=theta, head_dim=head_dim))


def double(rotary):
    return rotary._replace(cos=rotary.cos.double(), sin=rotary.sin.double())


def naive(attn, x, rope=None):
    """Per-head softmax(mask(QK^T / sqrt(d))) V in float64 with explicit loops over heads."""
    s = attn.spec
    W, b = attn.qkv.weight.double(), attn.qkv.bias
    qkv = x @ W.T + (b.double() if b is not None else 0)
    hd = s.head_size
    q = qkv[..., : s.n_heads * hd].reshape(B, T, s.n_heads, hd)
    k = qkv[..., s.n_heads * hd: (s.n_heads + s.n_kv_heads) * hd].reshape(B, T, s.n_kv_heads, hd)
    v = qkv[..., (s.n_heads + s.n_kv_heads) * hd:].reshape(B, T, s.n_kv_heads, hd)

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * w.double()

    if s.qk_norm:
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    if rope is not None:
        half = hd // 2
        pos = torch.arange(T, dtype=torch.float64)
        inv = 1.0 / rope.spec.theta ** (torch.arange(half, dtype=torch.float64) * 2 / hd)
        ang = pos[:, None] * inv[None, :]                       # [T, half]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

        def rot(t):
            a, bb = t[..., :half], t[..., half:]
            return torch.cat([a * cos - bb * sin, bb * cos + a * sin], -1)
        q, k = rot(q), rot(k)
    out = torch.zeros(B, T, s.n_heads, hd, dtype=torch.float64)
    group = s.n_heads // s.n_kv_heads
    for h in range(s.n_heads):
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        scores = q[:, :, h] @ kh.transpose(1, 2) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ vh
    y = out.reshape(B, T, s.n_heads * hd)
    return y @ attn.out.weight.double().T + attn.out.bias.double()


CASES = [(4, 4), (4, 2), (4, 1)]   # MHA, GQA, MQA


@pytest.mark.parametrize("heads,kv", CASES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("use_rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["noqk", "qknorm"])
def test_attention_matches_float64_reference(heads, kv, use_rope, qk_norm):
    attn = make(heads, kv, qk_norm)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rope = rope_for(attn.spec.head_size, 500.0) if use_rope else None
    rotary = None
    if rope is not None:
        rotary = double(rope.rotary(torch.arange(T)))
    got = attn(x, rotary)
    want = naive(attn, x, rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv", CASES, ids=["mha", "gqa", "mqa"])
def test_no_future_token_influences_the_past(heads, kv):
    attn = make(heads, kv, qk_norm=True)
    rope = rope_for(attn.spec.head_size)
    rotary = double(rope.rotary(torch.arange(T)))
    x = torch.randn(B, T, D, dtype=torch.float64)
    base = attn(x, rotary)
    for t in range(T):
        x2 = x.clone()
        x2[:, t] += torch.randn(B, D, dtype=torch.float64) * 3
        y = attn(x2, rotary)
        torch.testing.assert_close(y[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(y[:, t], base[:, t])


# ------------------------------------------------------------------ decoupled head_dim, QK-norm scope, sliding
# window, sinks and soft-capping, against the formulas written out in float64
def make_variant(**params):
    raw = {"n_heads": 4, "n_kv_heads": 2, "bias": True, **params}
    spec = build(CausalSelfAttention.Spec, raw, ctx={"d_model": D}, kind="causal", impl=CausalSelfAttention)
    torch.manual_seed(0)
    attn = CausalSelfAttention(spec).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


@torch.no_grad()
def reference(attn, x):
    """Each query position i (absolute start + i) over keys 0..i: cap(q.k / sqrt(E)), window, sink, softmax."""
    s = attn.spec
    E, H, K = s.head_size, s.n_heads, s.kv_heads
    qkv = x @ attn.qkv.weight.double().T
    q, k, v = qkv[..., :H * E], qkv[..., H * E:(H + K) * E], qkv[..., (H + K) * E:]
    biases = {n: getattr(attn, f"{n}_bias", None) for n in "qkv"}
    if attn.qkv.bias is not None:
        biases = dict(zip("qkv", attn.qkv.bias.split([H * E, K * E, K * E])))
    q, k, v = (t if biases[n] is None else t + biases[n] for n, t in zip("qkv", (q, k, v)))

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * w.double()

    if s.qk_norm and s.qk_norm_scope == "projection":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    n, t = x.shape[:2]
    q, k, v = q.reshape(n, t, H, E), k.reshape(n, t, K, E), v.reshape(n, t, K, E)
    if s.qk_norm and s.qk_norm_scope == "head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    out = torch.zeros(n, t, H, E, dtype=torch.float64)
    for b in range(n):
        for h in range(H):
            for i in range(t):
                logits, values = [], []
                for j in range(i + 1):
                    if s.window is not None and i - j >= s.window:
                        continue
                    score = float(q[b, i, h] @ k[b, j, h // (H // K)]) / math.sqrt(E)
                    if s.logit_softcap is not None:
                        score = s.logit_softcap * math.tanh(score / s.logit_softcap)
                    logits.append(score)
                    values.append(v[b, j, h // (H // K)])
                z = [math.exp(a) for a in logits]
                denom = sum(z) + (math.exp(float(attn.sinks[h])) if s.sinks else 0.0)
                out[b, i, h] = sum(w / denom * val for w, val in zip(z, values))
    y = out.reshape(n, t, H * E) @ attn.out.weight.double().T
    return y if attn.out.bias is None else y + attn.out.bias


VARIANTS = {"head_dim": {"head_dim": 12}, "qk_norm_projection": {"qk_norm": True, "qk_norm_scope": "projection"},
            "window": {"window": 3}, "sinks": {"sinks": True}, "softcap": {"logit_softcap": 1.5},
            "qkv_bias_only": {"bias": ("q", "k", "v")}, "k_v_o_bias": {"bias": ("k", "v", "o")},
            "all": {"head_dim": 6, "window": 2, "sinks": True, "logit_softcap": 2.0, "qk_norm": True}}


@pytest.mark.parametrize("params", VARIANTS.values(), ids=list(VARIANTS))
def test_attention_variants_match_their_formulas(params):
    attn = make_variant(**params)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(attn(x), reference(attn, x), rtol=1e-9, atol=1e-10)
    if "head_dim" in params:
        assert attn.qkv.weight.shape == ((4 + 2 * 2) * params["head_dim"], D)
    assert sum(p.numel() for p in attn.parameters()) == attn.spec.n_params


def test_biases_sit_on_the_projections_named():
    qwen2 = make_variant(bias=("q", "k", "v"))
    assert qwen2.qkv.bias is not None and qwen2.out.bias is None
    partial = make_variant(bias=("k", "v", "o"))
    assert partial.qkv.bias is None and not hasattr(partial, "q_bias")
    assert partial.k_bias.shape == partial.v_bias.shape == (2 * partial.spec.head_size,)
    assert make_variant(bias=False).qkv.bias is None


@pytest.mark.parametrize("params", VARIANTS.values(), ids=list(VARIANTS))
def test_token_by_token_decoding_through_the_cache_equals_the_full_forward(params):
    attn = make_variant(**params).eval()
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    full = attn(x)
    cache = LayerKVCache(B, attn.spec.kv_heads, T, attn.spec.head_size, "cpu", torch.float64,
                         window=attn.spec.window)
    steps = [attn(x[:, :2], cache=cache)] + [attn(x[:, i:i + 1], cache=cache) for i in range(2, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-10)


def test_a_sliding_window_cache_never_holds_more_than_the_window():
    attn = make_variant(window=3).eval()
    cache = LayerKVCache(1, 2, 64, attn.spec.head_size, "cpu", torch.float64, window=3)
    assert cache.k.shape[2] == 3
    x = torch.randn(1, 40, D, dtype=torch.float64)
    attn(x[:, :5], cache=cache)                        # a prompt longer than the window
    for i in range(5, 40):
        attn(x[:, i:i + 1], cache=cache)
        assert cache.k.shape[2] == 3 and cache.held == 3
    assert cache.pos == 40


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_cpu_autocast_projects_in_bf16_and_attends_in_fp32(monkeypatch, heads, kv):
    """Under CPU bf16 autocast the projections run in bf16 and the attention kernel gets fp32 q, k, v (torch's
    bf16 CPU attention is slower than its fp32 one); forward and gradients stay close to the fp32 layer's."""
    import torch.nn.functional as F
    import nanodecoder.components.attention_kernels as A
    attn = make(heads, kv).float()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    want = attn(x)
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
        assert attn.qkv(x).dtype == torch.bfloat16
    (gx_got,) = torch.autograd.grad(got.float().sum(), x)
    assert seen == [(torch.float32,) * 3 + (False,)] * 2      # the autocast call too, with autocast off inside
    assert got.dtype == torch.bfloat16
    for a, b in ((got.float(), want), (gx_got, gx_want)):             # bf16 rounding only
        assert (a - b).norm() < 0.02 * b.norm()
