"""One transformer block, composed from its registered parts (norm, attention, MLP) and the model's norm placement;
its positional encoding's rotary is computed by the decoder and handed in."""
from __future__ import annotations

import torch
from torch import nn

from .spec import BlockSpec

NORMS = {"pre": ("norm1", "norm2"), "post": ("post_norm1", "post_norm2"),
         "sandwich": ("norm1", "post_norm1", "norm2", "post_norm2")}


class Rotaries(tuple):
    """The rotaries of one forward pass, one per distinct positional encoding of the layers (None where it rotates
    nothing), in the decoder's order; each block takes its own (``Block.rotary_index``)."""


class Block(nn.Module):
    """``pre`` (GPT-2, LLaMA): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``;
    ``post`` (the original Transformer): ``post_norm1(x + attn(x))``, then ``post_norm2(x + mlp(x))``;
    ``sandwich`` (Gemma 2): ``x + post_norm1(attn(norm1(x)))``, then ``x + post_norm2(mlp(norm2(x)))``.
    The MLP may be an MoE; every norm is the block's norm kind.  ``rotary_index``: which of the rotaries the decoder
    hands every block (one per distinct positional of the layers) is this block's."""

    def __init__(self, spec: BlockSpec, placement: str = "pre", rotary_index: int = 0):
        super().__init__()
        self.placement = placement
        self.rotary_index = rotary_index
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
        """``rotary``: this block's rotary (a ``positional.Rotary`` or None), or the decoder's :class:`Rotaries`, of
        which it takes its own."""
        if isinstance(rotary, Rotaries):
            rotary = rotary[self.rotary_index]
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
