"""Positional encodings: ``learned`` (added to the input) and ``rope`` (rotates q and k).

The decoder asks its positional component for two things per forward pass:
``embed(pos)`` (an additive ``[T, D]`` tensor or None) and ``rotary(pos)``
(``(cos, sin)`` of shape ``[T, head_dim/2]`` or None) which it hands to every
attention layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import Component, ModelContext


class LearnedPositional(Component):
    """One learned vector per position (GPT-2's ``wpe``)."""

    @dataclass(frozen=True)
    class Spec:
        context_length: int
        dim: int

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        return cls.Spec(context_length=ctx.context_length, dim=ctx.d_model)

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.wpe = nn.Embedding(spec.context_length, spec.dim)

    def embed(self, pos: torch.Tensor) -> torch.Tensor:
        return self.wpe(pos)

    def rotary(self, pos: torch.Tensor):
        return None


class RoPE(Component):
    """Rotary embeddings (Su et al. 2021), pairing dimension i with i + head_dim/2
    (the "rotate half" layout of GPT-NeoX and Hugging Face LLaMA)."""

    @dataclass(frozen=True)
    class Spec:
        head_dim: int
        theta: float = 10000.0

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        return cls.Spec(head_dim=ctx.head_dim, theta=float(params.get("theta", 10000.0)))

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        half = self.spec.head_dim // 2
        exponent = torch.arange(half, dtype=torch.float64) * 2.0 / self.spec.head_dim
        return (1.0 / self.spec.theta ** exponent).float()

    def init_weights(self, init) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)   # also after to_empty() from meta

    def embed(self, pos: torch.Tensor):
        return None

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(pos.float(), self.inv_freq)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, H, T, head_dim]`` by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
