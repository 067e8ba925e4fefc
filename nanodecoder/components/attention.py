"""Causal self-attention (``kind: causal``): MHA, GQA and MQA in one class.

Queries have ``n_heads`` heads, keys and values ``n_kv_heads`` heads that are
shared by groups of query heads.  The softmax(QK^T/sqrt(d))V product is
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them).  With a KV cache the layer appends this call's keys and
values and attends over everything cached so far.

Shapes: B batch, T positions, D d_model, H query heads, K key/value heads,
E head dimension.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config.declare import Kind, context, declared, divisors, param
from .base import Component, mark_residual
from .positional import apply_rotary


class CausalSelfAttention(Component):
    """Causal self-attention through F.scaled_dot_product_attention; MHA, GQA (n_kv_heads < n_heads) or MQA (n_kv_heads: 1)."""

    @declared
    class Spec(Kind):
        n_heads: int = param(doc="Number of query heads; d_model must be divisible by it.", minimum=1)
        n_kv_heads: int | None = param(None, doc="Number of key/value heads (null: same as n_heads); must divide "
                                                 "n_heads.", minimum=1)
        bias: bool = param(False, doc="Biases on the q/k/v and output projections.")
        qk_norm: bool = param(False, doc="RMS-normalise queries and keys per head before attention.")
        dropout: float = param(0.0, doc="Attention and output dropout.", minimum=0, maximum=1)
        dim: int = context("d_model")

        @property
        def head_dim(self) -> int:
            return self.dim // self.n_heads

        @property
        def kv_heads(self) -> int:
            return self.n_kv_heads or self.n_heads

        def check(self):
            if self.dim % self.n_heads:
                yield ("n_heads",), (f"d_model ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                                     f"choose n_heads among {divisors(self.dim)}")
            elif self.n_heads % self.kv_heads:
                yield ("n_kv_heads",), (f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                                        f"({self.kv_heads}); choose n_kv_heads among {divisors(self.n_heads)}")

    def __init__(self, spec: "CausalSelfAttention.Spec"):
        super().__init__()
        self.spec = spec
        s = spec
        self.qkv = nn.Linear(s.dim, (s.n_heads + 2 * s.kv_heads) * s.head_dim, bias=s.bias)
        self.out = mark_residual(nn.Linear(s.n_heads * s.head_dim, s.dim, bias=s.bias))
        if s.qk_norm:
            self.q_norm = nn.RMSNorm(s.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(s.head_dim, eps=1e-6)
        self.resid_dropout = nn.Dropout(s.dropout)

    def forward(self, x_BTD: torch.Tensor, rotary=None, cache=None) -> torch.Tensor:
        s = self.spec
        q, k, v = self.qkv(x_BTD).split([s.n_heads * s.head_dim, s.kv_heads * s.head_dim,
                                         s.kv_heads * s.head_dim], dim=-1)
        q_BHTE = rearrange(q, "b t (h e) -> b h t e", h=s.n_heads)
        k_BKTE = rearrange(k, "b t (k e) -> b k t e", k=s.kv_heads)
        v_BKTE = rearrange(v, "b t (k e) -> b k t e", k=s.kv_heads)
        if s.qk_norm:
            q_BHTE, k_BKTE = self.q_norm(q_BHTE), self.k_norm(k_BKTE)
        if rotary is not None:
            cos, sin = rotary
            q_BHTE, k_BKTE = apply_rotary(q_BHTE, cos, sin), apply_rotary(k_BKTE, cos, sin)
        mask = None
        if cache is not None:
            k_BKTE, v_BKTE, mask = cache.update(k_BKTE, v_BKTE)
        if s.kv_heads != s.n_heads:
            rep = s.n_heads // s.kv_heads
            k_BKTE = k_BKTE.repeat_interleave(rep, dim=1)
            v_BKTE = v_BKTE.repeat_interleave(rep, dim=1)
        p = s.dropout if self.training else 0.0
        if mask is None:
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, dropout_p=p, is_causal=True)
        else:
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask=mask, dropout_p=p)
        return self.resid_dropout(self.out(rearrange(y_BHTE, "b h t e -> b t (h e)")))


class LayerKVCache:
    """Keys and values of one attention layer for incremental decoding."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        start, end = self.pos, self.pos + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} positions > {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.pos = end
        # query i (absolute position start + i) may see keys 0 .. start + i
        q_pos = torch.arange(start, end, device=k.device)[:, None]
        k_pos = torch.arange(end, device=k.device)[None, :]
        return self.k[:, :, :end], self.v[:, :, :end], k_pos <= q_pos
