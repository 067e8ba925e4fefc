"""One pre-norm transformer block, composed from its three registered parts."""
from __future__ import annotations

import torch
from torch import nn

from .spec import BlockSpec


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the MLP may be an MoE."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.norm1 = spec.norm.build()
        self.attn = spec.attention.build()
        self.norm2 = spec.norm.build()
        self.mlp = spec.mlp.build()

    def forward(self, x: torch.Tensor, rotary=None, cache=None):
        x = x + self.attn(self.norm1(x), rotary, cache)
        h, aux = self.mlp(self.norm2(x))
        return x + h, aux
