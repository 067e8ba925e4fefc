"""Positional encodings: ``learned`` (added to the input) and ``rope`` (rotates q and k).

The decoder asks its positional component for two things per forward pass:
``embed(pos)`` (an additive ``[T, D]`` tensor or None) and ``rotary(pos)``
(``(cos, sin)`` of shape ``[T, head_dim/2]`` or None) which it hands to every
attention layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config.declare import Kind, context, declared, param
from .base import Component


class LearnedPositional(Component):
    """Learned absolute position embeddings (GPT-2), one per context position."""

    @declared
    class Spec(Kind):
        context_length: int = context()
        dim: int = context("d_model")

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.wpe = nn.Embedding(spec.context_length, spec.dim)

    def embed(self, pos: torch.Tensor) -> torch.Tensor:
        return self.wpe(pos)

    def rotary(self, pos: torch.Tensor):
        return None


class RoPE(Component):
    """Rotary position embedding applied to queries and keys (Su et al. 2021), pairing dimension i with
    i + head_dim/2 (the "rotate half" layout of GPT-NeoX and Hugging Face LLaMA)."""

    ROTATES_HEADS = True       # the head dimension must be even and the same in every layer

    @declared
    class Spec(Kind):
        theta: float = param(10000.0, doc="RoPE base frequency (LLaMA-3 uses 500000).", exclusive_minimum=0)
        head_dim: int = context("block.attention.head_size")

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
