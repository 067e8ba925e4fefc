"""``mlp: {kind: swiglu_clamped}`` (GPT-OSS): (clamp(up, -l, l) + 1) * g * sigmoid(alpha g), g = min(gate, l)."""
from __future__ import annotations

import torch

from nanodecoder.components import component_spec


def formula(x, mlp, alpha, limit):
    h = x @ mlp.up.weight.T
    gate, up = h[..., :mlp.spec.hidden], h[..., mlp.spec.hidden:]
    g = torch.minimum(gate, torch.tensor(limit, dtype=h.dtype))
    u = torch.maximum(torch.minimum(up, torch.tensor(limit, dtype=h.dtype)), torch.tensor(-limit, dtype=h.dtype))
    return ((u + 1) * g / (1 + torch.exp(-alpha * g))) @ mlp.down.weight.T


def test_dense_clamped_swiglu_matches_the_formula_and_clamps():
    mlp = component_spec("mlp", {"kind": "swiglu_clamped", "hidden_size": 10, "alpha": 1.5, "limit": 0.5},
                         d_model=8).build().double()
    torch.manual_seed(0)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0.0, 1.0)            # pre-activations well past the limit
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(mlp(x)[0], formula(x, mlp, 1.5, 0.5), rtol=1e-12, atol=1e-12)
    assert (x @ mlp.up.weight.T).abs().max() > 0.5


def test_experts_use_the_gpt_oss_defaults():
    spec = component_spec("mlp", {"kind": "swiglu_clamped"}, d_model=8)
    assert (spec.alpha, spec.limit) == (1.702, 7.0)
    moe = component_spec("mlp", {"kind": "moe", "n_experts": 1, "top_k": 1, "expert_kind": "swiglu_clamped",
                                 "expert_hidden": 12}, d_model=8).build().double()
    dense = component_spec("mlp", {"kind": "swiglu_clamped", "hidden_size": 12}, d_model=8).build().double()
    with torch.no_grad():
        moe.experts.up.mul_(40.0)                     # big enough that the clamps act
        dense.up.weight.copy_(moe.experts.up[0].T)
        dense.down.weight.copy_(moe.experts.down[0].T)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense(x)[0], formula(x, dense, 1.702, 7.0), rtol=1e-10, atol=1e-12)
