"""RoPE scaling (llama3, yarn) and partial rotary, checked against the properties their papers state."""
from __future__ import annotations

import math

import pytest
import torch

from nanodecoder.components import component_spec
from nanodecoder.components.positional import apply_rotary, yarn_mscale
from nanodecoder.model import build_model, build_model_spec


def rope(head_dim=128, **params):
    return component_spec("positional", {"kind": "rope", **params}, block=_Block(head_dim)).build()


class _Block:                       # what the model hands down: block.attention.rotary_size
    def __init__(self, head_dim):
        self.attention = type("A", (), {"rotary_size": head_dim})()


def plain_inv_freq(theta, dim):
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def test_llama3_keeps_high_frequencies_divides_low_ones_and_ramps_between():
    scaling = {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    got = rope(theta=500000.0, scaling=scaling).inv_freq.double()
    base = plain_inv_freq(500000.0, 128)
    wavelen = 2 * math.pi / base
    high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    torch.testing.assert_close(got[high], base[high].float().double())
    torch.testing.assert_close(got[low], (base[low] / 8.0).float().double())
    mid = ~high & ~low
    assert mid.any() and torch.all(got[mid] < base[mid]) and torch.all(got[mid] > base[mid] / 8.0)
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)           # the published interpolation weight
    torch.testing.assert_close(got[mid], ((1 - smooth) * base[mid] / 8 + smooth * base[mid]).float().double())


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_interpolates_below_the_band_keeps_above_it_and_scales_cos_sin(truncate):
    dim, theta, factor, old = 64, 10000.0, 4.0, 2048
    r = rope(head_dim=dim, theta=theta, scaling={"kind": "yarn", "factor": factor,
                                                 "original_max_position_embeddings": old, "truncate": truncate})
    got, base = r.inv_freq.double(), plain_inv_freq(theta, dim)
    # a dimension pair keeps its frequency when its wavelength fits > beta_fast (32) times into the old context,
    # and is divided by factor when it fits < beta_slow (1) times
    rotations = old * base / (2 * math.pi)
    torch.testing.assert_close(got[rotations > 32 * 1.2], base[rotations > 32 * 1.2].float().double())
    torch.testing.assert_close(got[rotations < 1 / 1.2], (base[rotations < 1 / 1.2] / factor).float().double())
    cos, sin, _ = r.rotary(torch.arange(5))
    assert r.attention_factor == pytest.approx(0.1 * math.log(factor) + 1)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, r.attention_factor ** 2))


def test_yarn_mscale_of_deepseek():
    r = rope(theta=10000.0, scaling={"kind": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                     "mscale": 1.0, "mscale_all_dim": 1.0})
    assert r.attention_factor == 1.0 and yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40) + 1)


def test_partial_rotary_rotates_only_the_first_dimensions():
    r = rope(head_dim=16, partial=0.25)
    assert r.spec.rotary_dim == 4 and r.inv_freq.shape == (2,)
    x = torch.randn(1, 2, 5, 16)
    cos, sin, _ = r.rotary(torch.arange(5))
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    full = apply_rotary(x[..., :4], cos, sin)
    torch.testing.assert_close(y[..., :4], full)
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_a_llama31_like_toy_with_scaled_partial_rope_builds_and_decodes_through_the_cache():
    spec = build_model_spec({"vocab_size": 30, "context_length": 16, "d_model": 32, "n_layers": 2,
                             "positional": {"kind": "rope", "theta": 500000.0, "partial": 0.5,
                                            "scaling": {"kind": "llama3", "factor": 8.0,
                                                        "original_max_position_embeddings": 8}},
                             "block": {"norm": {"kind": "rmsnorm"}, "mlp": {"kind": "swiglu"},
                                       "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}}})
    model = build_model(spec, seed=0).eval()
    idx = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        full = model(idx[:, :9], logits_to_keep=1).logits
        cache = model.new_kv_cache(2)
        model(idx[:, :8], cache=cache)
        step = model(idx[:, 8:9], cache=cache).logits
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
