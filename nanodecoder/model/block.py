"""One transformer block, composed from its registered parts (norm, attention, MLP) and the model's norm placement;
its positional encoding's rotary is computed by the decoder and handed in."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .spec import BlockSpec

NORMS = {"pre": ("norm1", "norm2"), "post": ("post_norm1", "post_norm2"),
         "sandwich": ("norm1", "post_norm1", "norm2", "post_norm2")}


class Rotaries(tuple):
    """The rotaries of one forward pass, one per distinct positional encoding of the layers (None where it rotates
    nothing), in the decoder's order; each block takes its own (``Block.rotary_index``).  ``tokens``: the pass's
    token ids [B, T] (what a block's value embedding looks up), or None."""

    def __new__(cls, rotaries=(), tokens: torch.Tensor | None = None):
        out = super().__new__(cls, rotaries)
        out.tokens = tokens
        return out


class ValueEmbedding(nn.Module):
    """A layer's value embedding (modded-nanogpt): ``v = a v + b table[token]``, a and b learned scalars (``mix``)."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, width)
        self.mix = nn.Parameter(torch.ones(2))

    def reset_parameters(self) -> None:
        """a = b = 1 (the table is initialised as an embedding by ``init_model``)."""
        nn.init.ones_(self.mix)

    def forward(self, tokens: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = self.mix.to(v.dtype)
        return a * v + b * self.table(tokens).to(v.dtype)


class Block(nn.Module):
    """``pre`` (GPT-2, LLaMA): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``;
    ``post`` (the original Transformer): ``post_norm1(x + attn(x))``, then ``post_norm2(x + mlp(x))``;
    ``sandwich`` (Gemma 2): ``x + post_norm1(attn(norm1(x)))``, then ``x + post_norm2(mlp(norm2(x)))``.
    The MLP may be an MoE; every norm is the block's norm kind.  ``rotary_index``: which of the rotaries the decoder
    hands every block (one per distinct positional of the layers) is this block's."""

    def __init__(self, spec: BlockSpec, placement: str = "pre", rotary_index: int = 0, vocab_size: int | None = None):
        super().__init__()
        self.placement = placement
        self.rotary_index = rotary_index
        if spec.value_embedding:          # model.value_embeddings: a table of vocab_size rows
            self.value_embed = ValueEmbedding(vocab_size, spec.attention.value_width)
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
        which it takes its own (and with a value embedding, the token ids: ``Rotaries.tokens``)."""
        attn = self.attn
        if hasattr(self, "value_embed"):
            tokens = getattr(rotary, "tokens", None)
            if tokens is None:
                raise ValueError("a block with a value embedding needs the token ids: hand it the decoder's "
                                 "Rotaries(rotaries, tokens=idx)")
            attn = functools.partial(self.attn, values=functools.partial(self.value_embed, tokens))
        if isinstance(rotary, Rotaries):
            rotary = rotary[self.rotary_index]
        if self.placement == "pre":
            x = x + attn(self.norm1(x), rotary, cache)
            h, aux = self.mlp(self.norm2(x))
            return x + h, aux
        if self.placement == "post":
            x = self.post_norm1(x + attn(x, rotary, cache))
            h, aux = self.mlp(x)
            return self.post_norm2(x + h), aux
        x = x + self.post_norm1(attn(self.norm1(x), rotary, cache))
        h, aux = self.mlp(self.norm2(x))
        return x + self.post_norm2(h), aux
