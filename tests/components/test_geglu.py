"""``mlp: {kind: geglu}``: down(gelu_tanh(x W_gate) * x W_up), against the formula in float64, dense and as experts."""
from __future__ import annotations

import math

import torch

from nanodecoder.components import component_spec


def gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016): 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))."""
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def test_dense_geglu_matches_the_formula():
    torch.manual_seed(0)
    mlp = component_spec("mlp", {"kind": "geglu", "hidden_size": 12, "bias": True}, d_model=8).build().double()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    w_gate, w_up = mlp.up.weight[:12], mlp.up.weight[12:]
    b_gate, b_up = mlp.up.bias[:12], mlp.up.bias[12:]
    want = (gelu_tanh(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ mlp.down.weight.T + mlp.down.bias
    got, aux = mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert aux == {}


def test_default_width_is_that_of_the_gated_mlps():
    assert component_spec("mlp", {"kind": "geglu"}, d_model=96).hidden == 256     # 8/3 * 96, as swiglu


def test_geglu_experts_compute_the_dense_geglu():
    torch.manual_seed(0)
    moe = component_spec("mlp", {"kind": "moe", "n_experts": 1, "top_k": 1, "expert_kind": "geglu",
                                 "expert_hidden": 12, "router": {"kind": "topk"}}, d_model=8).build().double()
    dense = component_spec("mlp", {"kind": "geglu", "hidden_size": 12}, d_model=8).build().double()
    with torch.no_grad():
        dense.up.weight.copy_(moe.experts.up[0].T)
        dense.down.weight.copy_(moe.experts.down[0].T)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-10, atol=1e-12)   # one expert, weight 1
