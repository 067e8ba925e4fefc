"""Normalisation layers: ``layernorm`` and ``rmsnorm``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Component


class LayerNorm(Component):
    """LayerNorm with an optional bias (GPT-2 has one, nanoGPT's ``bias=False`` has not)."""

    @dataclass(frozen=True)
    class Spec:
        dim: int
        bias: bool = True
        eps: float = 1e-5

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
    """Root-mean-square norm (no centring, no bias), computed in float32."""

    @dataclass(frozen=True)
    class Spec:
        dim: int
        eps: float = 1e-6

    def __init__(self, spec: "RMSNorm.Spec"):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(spec.dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.spec.dim,), self.weight.float(), self.spec.eps).type_as(x)
