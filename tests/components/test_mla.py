"""Multi-head latent attention against a float64 implementation written from the DeepSeek-V2 paper's equations
(section 2.1, eqs. 9-19: latents, up-projections, decoupled RoPE keys), for the full forward and for decoding
token by token through the latent KV cache."""
from __future__ import annotations

import math

import pytest
import torch

from nanodecoder.components import component_spec
from nanodecoder.components.positional import Rotary

B, T, D = 2, 7, 24


def make(**params):
    raw = {"kind": "mla", "n_heads": 3, "q_lora_rank": 10, "kv_lora_rank": 6, "qk_nope_head_dim": 4,
           "qk_rope_head_dim": 4, "v_head_dim": 5, **params}
    torch.manual_seed(0)
    attn = component_spec("attention", raw, d_model=D).build().double()
    with torch.no_grad():
        for p in attn.parameters():      # norm gains and biases too, so a dropped or swapped tensor shows
            p.normal_(0, 0.4)
    return attn


def rotary(T_, R, theta=100.0, factor=1.0):
    inv = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.outer(torch.arange(T_, dtype=torch.float64), inv)
    return Rotary(ang.cos(), ang.sin(), factor), inv


def rope_vec(v, pos, inv):
    """Rotate pairs (d, d + R/2) of one vector by pos * inv[d] (the rotate-half layout)."""
    h = v.shape[-1] // 2
    out = v.clone()
    for d in range(h):
        a = pos * float(inv[d])
        out[d] = v[d] * math.cos(a) - v[d + h] * math.sin(a)
        out[d + h] = v[d + h] * math.cos(a) + v[d] * math.sin(a)
    return out


@torch.no_grad()
def paper(attn, x, inv, softmax_factor=1.0):
    s = attn.spec
    H, N, R, V, C = s.n_heads, s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim, s.kv_lora_rank

    def lin(layer, v):
        y = layer.weight.double() @ v
        return y if layer.bias is None else y + layer.bias.double()

    def rms(v, norm):
        return v / torch.sqrt((v * v).mean() + s.latent_norm_eps) * norm.weight.double()

    w_uk = attn.kv_up.weight.double().view(H, N + V, C)[:, :N]          # W^UK per head
    w_uv = attn.kv_up.weight.double().view(H, N + V, C)[:, N:]          # W^UV per head
    out = torch.zeros(x.shape[0], x.shape[1], D, dtype=torch.float64)
    for b in range(x.shape[0]):
        c_kv, k_rope, q = [], [], []
        for t in range(x.shape[1]):
            h_t = x[b, t]
            down = lin(attn.kv_down, h_t)
            c_kv.append(rms(down[:C], attn.kv_norm))                         # c^KV_t (eq. 9, normalised)
            k_rope.append(rope_vec(down[C:], t, inv))                       # k^R_t = RoPE(W^KR h_t) (eq. 15)
            c_q = rms(lin(attn.q_down, h_t), attn.q_norm) if s.q_lora_rank else None
            q.append((attn.q_up.weight.double() @ c_q if c_q is not None else
                      attn.q_proj.weight.double() @ h_t).view(H, N + R))    # [q^C ; q^R] per head (eqs. 12-14)
        for t in range(x.shape[1]):
            heads = []
            for i in range(H):
                q_c, q_r = q[t][i, :N], rope_vec(q[t][i, N:], t, inv)
                scores = torch.stack([(q_c @ (w_uk[i] @ c_kv[j]) + q_r @ k_rope[j]) for j in range(t + 1)])
                probs = torch.softmax(scores * softmax_factor / math.sqrt(N + R), dim=0)
                heads.append(sum(probs[j] * (w_uv[i] @ c_kv[j]) for j in range(t + 1)))   # eqs. 18-19
            out[b, t] = lin(attn.out, torch.cat(heads))
    return out


VARIANTS = {"deepseek_v3": {}, "no_q_lora": {"q_lora_rank": None}, "bias": {"bias": True},
            "unequal_dims": {"qk_nope_head_dim": 6, "qk_rope_head_dim": 2, "v_head_dim": 3}}


@pytest.mark.parametrize("params", VARIANTS.values(), ids=list(VARIANTS))
def test_mla_matches_the_paper_equations(params):
    attn = make(**params)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rot, inv = rotary(T, attn.spec.qk_rope_head_dim, factor=1.3)
    torch.testing.assert_close(attn(x, rot), paper(attn, x, inv, softmax_factor=1.3), rtol=1e-9, atol=1e-10)
    assert sum(p.numel() for p in attn.parameters()) == attn.spec.n_params


@pytest.mark.parametrize("params", VARIANTS.values(), ids=list(VARIANTS))
def test_decoding_through_the_latent_cache_equals_the_full_forward(params):
    attn = make(**params).eval()
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rot, _ = rotary(T, attn.spec.qk_rope_head_dim)
    full = attn(x, rot)
    cache = attn.new_cache(B, T, "cpu", torch.float64)
    part = lambda a, b: Rotary(rot.cos[a:b], rot.sin[a:b])          # noqa: E731
    steps = [attn(x[:, :3], part(0, 3), cache)] + [attn(x[:, i:i + 1], part(i, i + 1), cache) for i in range(3, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-10)


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    attn = make()
    s = attn.spec
    cache = attn.new_cache(1, 16, "cpu", torch.float64)
    assert cache.c.shape == (1, 16, s.kv_lora_rank) and cache.k_rope.shape == (1, 16, s.qk_rope_head_dim)
    assert s.cache_width == s.kv_lora_rank + s.qk_rope_head_dim < 2 * s.n_heads * s.score_dim


def test_an_mla_model_decodes_with_its_cache_and_deepseek_softmax_scale():
    from nanodecoder.model import build_model, build_model_spec
    from nanodecoder.model.generate import generate
    mla = {"kind": "mla", "n_heads": 2, "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
           "qk_rope_head_dim": 4, "v_head_dim": 4}
    raw = {"vocab_size": 50, "context_length": 24, "d_model": 16, "n_layers": 2,
           "positional": {"kind": "rope", "scaling": {"kind": "yarn", "factor": 40.0, "mscale": 1.0,
                                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 8}},
           "block": {"norm": {"kind": "rmsnorm"}, "attention": mla, "mlp": {"kind": "swiglu"}}}
    model = build_model(build_model_spec(raw), seed=0).eval()
    rot = model.pos.rotary(torch.arange(4))
    assert rot.softmax_factor == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 10, temperature=0.0),
                       generate(model, prompt, 10, temperature=0.0, use_cache=False))
