"""Optimizer roles come from the kinds: a norm kind nobody listed (a plug-in's) is a norm for ``roles: [norm]``."""
from __future__ import annotations

import torch
from torch import nn

from nanodecoder.components import component_spec, register
from nanodecoder.components.base import Component
from nanodecoder.components.contracts import NormKind
from nanodecoder.config.declare import context, declared, param
from nanodecoder.config.registry import make_catalog
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.train.optim import param_roles


class DyT(Component):
    """Dynamic tanh (Zhu et al. 2025): y = weight * tanh(alpha * x) + bias, a norm with no statistics."""

    @declared
    class Spec(NormKind):
        alpha: float = param(0.5, doc="Initial alpha.", exclusive_minimum=0)
        dim: int = context("d_model")

        @property
        def n_params(self):
            return 1 + 2 * self.dim

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.alpha = nn.Parameter(torch.tensor(spec.alpha))
        self.weight = nn.Parameter(torch.ones(spec.dim))
        self.bias = nn.Parameter(torch.zeros(spec.dim))

    def reset_parameters(self):
        nn.init.constant_(self.alpha, self.spec.alpha)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


def test_a_norm_kind_nobody_listed_gets_the_norm_role():
    catalog = make_catalog(register, plugins=False)
    catalog["norm"].add("test_dyt", DyT, origin="plug-in 'test'")
    holder = nn.Module()
    holder.norm = component_spec("norm", {"kind": "test_dyt"}, catalog, d_model=8).build()
    holder.proj = nn.Linear(8, 8)
    roles = param_roles(holder)
    for p in holder.norm.parameters():
        assert "norm" in roles[id(p)]
    assert "norm" not in roles[id(holder.proj.weight)]
    assert roles[id(holder.norm.bias)] >= {"norm", "bias", "not_matrix"}


def test_built_in_kinds_keep_their_roles():
    spec = build_model_spec({"vocab_size": 32, "context_length": 8, "d_model": 16, "n_layers": 1,
                             "block": {"attention": {"kind": "causal", "n_heads": 2, "qk_norm": True},
                                       "mlp": {"kind": "moe", "n_experts": 2, "top_k": 1, "n_shared_experts": 1}}})
    model = build_model(spec)
    roles = param_roles(model)
    names = dict(model.named_parameters())
    role = {n: roles[id(p)] for n, p in names.items()}
    assert "norm" in role["blocks.0.norm1.weight"] and "norm" in role["norm.weight"]
    assert "norm" in role["blocks.0.attn.q_norm.weight"]            # torch's nn.RMSNorm inside attention
    assert "router" in role["blocks.0.mlp.router.weight"]
    assert all("expert" in r for n, r in role.items() if ".experts." in n or ".shared." in n)
    assert not any("norm" in r for n, r in role.items() if "norm" not in n)
