"""Causal self-attention (``kind: causal``): MHA, GQA and MQA in one class.

Queries have ``n_heads`` heads, keys and values ``n_kv_heads`` heads that are
shared by groups of query heads.  The softmax(QK^T/sqrt(d))V product is
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them).  With a KV cache the layer appends this call's keys and
values and attends over everything cached so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Component, ModelContext, mark_residual
from .positional import apply_rotary


class CausalSelfAttention(Component):

    @dataclass(frozen=True)
    class Spec:
        dim: int
        n_heads: int
        n_kv_heads: int
        head_dim: int
        bias: bool = False
        qk_norm: bool = False
        dropout: float = 0.0

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        n_heads = params["n_heads"]
        return cls.Spec(dim=ctx.d_model, n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
                        head_dim=ctx.d_model // n_heads, bias=params.get("bias", False),
                        qk_norm=params.get("qk_norm", False), dropout=params.get("dropout", 0.0))

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        s = spec
        self.qkv = nn.Linear(s.dim, (s.n_heads + 2 * s.n_kv_heads) * s.head_dim, bias=s.bias)
        self.out = mark_residual(nn.Linear(s.n_heads * s.head_dim, s.dim, bias=s.bias))
        if s.qk_norm:
            self.q_norm = nn.RMSNorm(s.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(s.head_dim, eps=1e-6)
        self.resid_dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, rotary=None, cache=None) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim,
                                     s.n_kv_heads * s.head_dim], dim=-1)
        q = q.view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v, mask = cache.update(k, v)
        else:
            mask = None
        if s.n_kv_heads != s.n_heads:
            rep = s.n_heads // s.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        p = s.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim)
        return self.resid_dropout(self.out(y))


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
