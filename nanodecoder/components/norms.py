"""Normalisation layers: ``layernorm`` and ``rmsnorm``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.declare import context, declared, param
from .base import Component
from .contracts import NormKind


class LayerNorm(Component):
    """LayerNorm (GPT-2), with an optional bias (nanoGPT's ``bias=False`` has none)."""

    @declared
    class Spec(NormKind):
        bias: bool = param(True, doc="Learnable bias (GPT-2: true; nanoGPT bias=False: false).")
        eps: float = param(1e-5, doc="Epsilon added to the variance.", exclusive_minimum=0)
        dim: int = context("d_model")

        @property
        def n_params(self) -> int:
            return self.dim * (2 if self.bias else 1)

    def __init__(self, spec: "LayerNorm.Spec"):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(spec.dim))
        self.bias = nn.Parameter(torch.zeros(spec.dim)) if spec.bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.spec.dim,), self.weight, self.bias, self.spec.eps)


class RMSNorm(Component):
    """RMSNorm (LLaMA): root-mean-square norm, no centring, no bias, computed in float32 (or float64)."""

    @declared
    class Spec(NormKind):
        eps: float = param(1e-6, doc="Epsilon added to the mean square.", exclusive_minimum=0)
        dim: int = context("d_model")

        @property
        def n_params(self) -> int:
            return self.dim

    def __init__(self, spec: "RMSNorm.Spec"):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(spec.dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)      # at least float32 (float64 stays float64)
        return F.rms_norm(x.to(dtype), (self.spec.dim,), self.weight.to(dtype), self.spec.eps).type_as(x)
