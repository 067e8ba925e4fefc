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
        max_len: int = 0          # positions with a cached cos/sin table (the context length)

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        return cls.Spec(head_dim=ctx.head_dim, theta=float(params.get("theta", 10000.0)),
                        max_len=ctx.context_length)

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        cos, sin = self._angles(torch.arange(spec.max_len), self.inv_freq)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        half = self.spec.head_dim // 2
        exponent = torch.arange(half, dtype=torch.float64) * 2.0 / self.spec.head_dim
        return (1.0 / self.spec.theta ** exponent).float()

    @staticmethod
    def _angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(pos.to(inv_freq.device).float(), inv_freq)
        return angles.cos(), angles.sin()

    def init_weights(self, init) -> None:
        """Recompute the (non-persistent) tables, also after ``to_empty()`` from the meta device."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        cos, sin = self._angles(torch.arange(self.spec.max_len), self.inv_freq)
        self.cos_table, self.sin_table = cos, sin

    def embed(self, pos: torch.Tensor):
        return None

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, head_dim/2]`` of the positions ``pos``, read from the tables.

        A table read rather than ``cos(pos * inv_freq)``: under torch.compile the
        latter is fused into every q/k element's kernel and recomputed B*H times.
        Positions must be below ``max_len`` (the decoder checks the context length
        before); a RoPE built without one computes them.
        """
        if self.spec.max_len:
            return self.cos_table.index_select(0, pos), self.sin_table.index_select(0, pos)
        return self._angles(pos, self.inv_freq)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, H, T, head_dim]`` by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
