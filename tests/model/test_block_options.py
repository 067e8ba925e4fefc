"""Norm placement (pre / post / sandwich), embedding scaling and output-logit soft-capping, written out."""
from __future__ import annotations

import math

import pytest
import torch

from nanodecoder.model import build_model, build_model_spec
from nanodecoder.model.params import count_params
from trainhelpers import fit_pattern


def model_raw(**model):
    return {"vocab_size": 40, "context_length": 16, "d_model": 16, "n_layers": 2,
            "positional": {"kind": "rope"},
            "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 2},
                      "mlp": {"kind": "geglu", "hidden_size": 24}}, **model}


def randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)      # norm gains too, so a swapped or dropped norm shows
    return model.double()


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_norm_placement_follows_its_formula(placement):
    model = randomised(build_model(build_model_spec(model_raw(norm_placement=placement)), seed=0))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    r = model.pos.rotary(torch.arange(6))
    rotary = r._replace(cos=r.cos.double(), sin=r.sin.double())
    for block in model.blocks:
        attn = lambda h: block.attn(h, rotary)          # noqa: E731
        mlp = lambda h: block.mlp(h)[0]                 # noqa: E731
        if placement == "pre":
            h = x + attn(block.norm1(x))
            want = h + mlp(block.norm2(h))
        elif placement == "post":
            h = block.post_norm1(x + attn(x))
            want = block.post_norm2(h + mlp(h))
        else:
            h = x + block.post_norm1(attn(block.norm1(x)))
            want = h + block.post_norm2(mlp(block.norm2(h)))
        torch.testing.assert_close(block(x, rotary)[0], want, rtol=1e-12, atol=1e-12)
    norms = {"pre": 2, "post": 2, "sandwich": 4}[placement]
    rows = {r.name: r.count for r in count_params(model).rows}
    assert rows["norm (rmsnorm)"] == 2 * norms * 16


def test_embedding_scale_and_logit_softcap():
    plain = randomised(build_model(build_model_spec(model_raw()), seed=0))
    capped = randomised(build_model(build_model_spec(model_raw(embed_scale=True, logit_softcap=2.0)), seed=0))
    idx = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain.wte.weight.mul_(math.sqrt(16))     # the same model with its embeddings scaled by hand
    torch.testing.assert_close(capped.hidden(idx)[0], plain.hidden(idx)[0], rtol=1e-12, atol=1e-12)
    raw_logits = capped.head(capped.hidden(idx)[0])
    want = 2.0 * torch.tanh(raw_logits / 2.0)
    out = capped(idx, idx)
    torch.testing.assert_close(out.logits, want, rtol=1e-12, atol=1e-12)
    assert out.logits.abs().max() < 2.0 < raw_logits.abs().max()
    want_loss = torch.nn.functional.cross_entropy(want.float().reshape(-1, 40), idx.reshape(-1))
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-6, atol=1e-6)
    cached = capped(idx[:, :3], cache=capped.new_kv_cache(2))
    torch.testing.assert_close(cached.logits[:, -1], want[:, 2], rtol=1e-10, atol=1e-10)


GEMMA_LIKE = model_raw(
    d_model=32, n_layers=4, context_length=32, embed_scale=True, logit_softcap=30.0, norm_placement="sandwich",
    block={"norm": {"kind": "rmsnorm"}, "mlp": {"kind": "geglu", "hidden_size": 48},
           "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "logit_softcap": 50.0,
                         "window": 6}},
    overrides=[{"layers": {"start": 1, "every": 2},
                "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "logit_softcap": 50.0,
                              "sinks": True}}])


def test_a_gemma_like_model_trains_and_decodes_through_its_bounded_cache():
    from nanodecoder.model.generate import generate
    model = build_model(build_model_spec(GEMMA_LIKE), seed=0)
    assert [b.attn.spec.window for b in model.blocks] == [6, None, 6, None]
    losses, data = fit_pattern(model, 40)
    assert losses[-1] < 0.7 * losses[0]          # 3.69 -> 1.94 here
    prompt = data[:5].unsqueeze(0)
    with_cache = generate(model, prompt, 20, temperature=0.0)
    without = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without)
    cache = model.new_kv_cache(1)
    model.eval()
    with torch.no_grad():
        model(data[:25].unsqueeze(0), cache=cache)
    assert [c.k.shape[2] for c in cache] == [6, 32, 6, 32] and cache[0].held == 6
