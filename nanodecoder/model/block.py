"""One transformer block, composed from its three registered parts and the model's norm placement."""
from __future__ import annotations

import torch
from torch import nn

from .spec import BlockSpec

NORMS = {"pre": ("norm1", "norm2"), "post": ("post_norm1", "post_norm2"),
         "sandwich": ("norm1", "post_norm1", "norm2", "post_norm2")}


class Block(nn.Module):
    """``pre`` (GPT-2, LLaMA): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``;
    ``post`` (the original Transformer): ``post_norm1(x + attn(x))``, then ``post_norm2(x + mlp(x))``;
    ``sandwich`` (Gemma 2): ``x + post_norm1(attn(norm1(x)))``, then ``x + post_norm2(mlp(norm2(x)))``.
    The MLP may be an MoE; every norm is the block's norm kind."""

    def __init__(self, spec: BlockSpec, placement: str = "pre"):
        super().__init__()
        self.placement = placement
        if placement != "post":
            self.norm1 = spec.norm.build()
        self.attn = spec.attention.build()
        if placement != "pre":
            self.post_norm1 = spec.norm.build()
        if placement != "post":
            self.norm2 = spec.norm.build()
        self.mlp = spec.mlp.build()
        if placement != "pre":
            self.post_norm2 = spec.norm.build()

    def norms(self) -> list[nn.Module]:
        return [getattr(self, name) for name in NORMS[self.placement]]

    def forward(self, x: torch.Tensor, rotary=None, cache=None):
        if self.placement == "pre":
            x = x + self.attn(self.norm1(x), rotary, cache)
            h, aux = self.mlp(self.norm2(x))
            return x + h, aux
        if self.placement == "post":
            x = self.post_norm1(x + self.attn(x, rotary, cache))
            h, aux = self.mlp(x)
            return self.post_norm2(x + h), aux
        x = x + self.post_norm1(self.attn(self.norm1(x), rotary, cache))
        h, aux = self.mlp(self.norm2(x))
        return x + self.post_norm2(h), aux
