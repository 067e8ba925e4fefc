"""Dense feed-forward blocks: ``gelu``, ``swiglu`` and ``relu2``.

The activation functions are shared with the MoE experts (``ACTIVATIONS``),
so a routed expert of kind ``swiglu`` computes exactly what the dense
``swiglu`` MLP computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Component, ModelContext, mark_residual, no_aux


def hidden_size(params: dict[str, Any], d_model: int, default_mult: float) -> int:
    """``hidden_size`` if given, else ``hidden_mult * d_model`` rounded up to ``multiple_of``."""
    if params.get("hidden_size") is not None:
        return int(params["hidden_size"])
    mult = params.get("hidden_mult", default_mult)
    multiple = params.get("multiple_of", 16)
    return int(multiple * math.ceil(mult * d_model / multiple))


def gelu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(h, approximate=approximate)


def relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``h`` holds [gate | up] on its last dimension."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# name -> (function of the up-projected activations, up-projection width factor)
ACTIVATIONS = {"gelu": (gelu, 1), "relu2": (relu2, 1), "swiglu": (swiglu, 2)}
DEFAULT_MULT = {"gelu": 4.0, "relu2": 4.0, "swiglu": 8.0 / 3.0}


class _DenseMLP(Component):
    """Up-projection, activation, down-projection.  Subclasses name the activation."""

    ACT: str

    @dataclass(frozen=True)
    class Spec:
        dim: int
        hidden: int
        bias: bool = False
        dropout: float = 0.0
        approximate: str = "none"

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        return cls.Spec(dim=ctx.d_model, hidden=hidden_size(params, ctx.d_model, DEFAULT_MULT[cls.ACT]),
                        bias=params.get("bias", False), dropout=params.get("dropout", 0.0),
                        approximate=params.get("approximate", "none"))

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        act, width = ACTIVATIONS[self.ACT]
        self.up = nn.Linear(spec.dim, width * spec.hidden, bias=spec.bias)
        self.down = mark_residual(nn.Linear(spec.hidden, spec.dim, bias=spec.bias))
        self.dropout = nn.Dropout(spec.dropout)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.ACT][0](h)

    def forward(self, x: torch.Tensor):
        return self.dropout(self.down(self.activate(self.up(x)))), no_aux()


class GeluMLP(_DenseMLP):
    """GPT-2's MLP: Linear -> GELU (exact, or ``approximate: tanh`` as in GPT-2) -> Linear."""
    ACT = "gelu"

    def activate(self, h):
        return gelu(h, self.spec.approximate)


class SwiGLUMLP(_DenseMLP):
    """LLaMA's gated MLP: down(silu(gate(x)) * up(x)); gate and up share one matmul."""
    ACT = "swiglu"


class ReLU2MLP(_DenseMLP):
    """Squared-ReLU MLP (Primer, modded-nanoGPT)."""
    ACT = "relu2"
