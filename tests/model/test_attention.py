"""Causal attention against a naive float64 reference, and causality by perturbation."""
import math

import pytest
import torch

from nanodecoder.components.attention import CausalSelfAttention
from nanodecoder.config.declare import build
from nanodecoder.components.positional import RoPE

D, T, B = 32, 7, 2


def make(n_heads, n_kv_heads, qk_norm=False, bias=True):
    spec = build(CausalSelfAttention.Spec, {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "qk_norm": qk_norm,
                                            "bias": bias}, ctx={"d_model": D}, kind="causal", impl=CausalSelfAttention)
    torch.manual_seed(0)
    attn = CausalSelfAttention(spec).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def rope_for(head_dim, theta=10000.0):
    return RoPE(RoPE.Spec(kind="rope", impl=RoPE, theta=theta, head_dim=head_dim))


def naive(attn, x, rope=None):
    """Per-head softmax(mask(QK^T / sqrt(d))) V in float64 with explicit loops over heads."""
    s = attn.spec
    W, b = attn.qkv.weight.double(), attn.qkv.bias
    qkv = x @ W.T + (b.double() if b is not None else 0)
    hd = s.head_dim
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
    rope = rope_for(attn.spec.head_dim, 500.0) if use_rope else None
    rotary = None
    if rope is not None:
        cos, sin = rope.rotary(torch.arange(T))
        rotary = (cos.double(), sin.double())
    got = attn(x, rotary)
    want = naive(attn, x, rope)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv", CASES, ids=["mha", "gqa", "mqa"])
def test_no_future_token_influences_the_past(heads, kv):
    attn = make(heads, kv, qk_norm=True)
    rope = rope_for(attn.spec.head_dim)
    cos, sin = rope.rotary(torch.arange(T))
    rotary = (cos.double(), sin.double())
    x = torch.randn(B, T, D, dtype=torch.float64)
    base = attn(x, rotary)
    for t in range(T):
        x2 = x.clone()
        x2[:, t] += torch.randn(B, D, dtype=torch.float64) * 3
        y = attn(x2, rotary)
        torch.testing.assert_close(y[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(y[:, t], base[:, t])
