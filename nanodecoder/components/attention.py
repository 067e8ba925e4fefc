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

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config.declare import Kind, context, declared, divisors, param
from .base import Component, mark_residual
from .contracts import FP32, AttentionBytes, AttentionKind, dropout_mask
from .positional import apply_rotary


class CausalSelfAttention(Component):
    """Causal self-attention through F.scaled_dot_product_attention; MHA, GQA (n_kv_heads < n_heads) or MQA (n_kv_heads: 1)."""

    @declared
    class Spec(AttentionKind):
        n_heads: int = param(doc="Number of query heads; d_model must be divisible by it unless head_dim is given.",
                             minimum=1)
        n_kv_heads: int | None = param(None, doc="Number of key/value heads (null: same as n_heads); must divide "
                                                 "n_heads.", minimum=1)
        head_dim: int | None = param(None, doc="Width of each head (null: d_model / n_heads); the q and output "
                                               "projections are n_heads * head_dim wide (Gemma, Qwen3, GPT-OSS).",
                                     minimum=1)
        bias: bool | tuple[Literal["q", "k", "v", "o"], ...] = param(
            False, doc="Biases on the projections: true (q, k, v and output: GPT-2, GPT-OSS), false (none: LLaMA), or "
                       "a list of those that have one, e.g. [q, k, v] (Qwen2: none on the output).", min_items=1)
        qk_norm: bool = param(False, doc="RMS-normalise queries and keys before attention (and before RoPE).")
        qk_norm_scope: Literal["head", "projection"] = param(
            "head", doc="What qk_norm normalises: each head over head_dim (Qwen3, OLMo 2) or the whole q and k "
                        "projections, n_heads * head_dim and n_kv_heads * head_dim wide, before the heads are split "
                        "(OLMoE).")
        qk_norm_eps: float = param(1e-6, doc="Epsilon of the q/k RMSNorms (models use their rms_norm_eps: Qwen3 "
                                             "1e-6, OLMoE 1e-5).", exclusive_minimum=0)
        window: int | None = param(None, doc="Sliding-window attention: each query sees itself and the window - 1 "
                                             "positions before it (null: every earlier position); a layer's KV cache "
                                             "then holds at most window positions. Set it per layer with overrides "
                                             "for local/global patterns.", minimum=1)
        sinks: bool = param(False, doc="A learned logit per head that joins every softmax's denominator (attention "
                                       "sinks, GPT-OSS): a query may put weight on nothing.")
        logit_softcap: float | None = param(None, doc="Soft-cap the attention scores: cap * tanh(score / cap) before "
                                                      "the softmax (Gemma 2: 50); null: off.", exclusive_minimum=0)
        dropout: float = param(0.0, doc="Attention and output dropout.", minimum=0, maximum=1)
        dim: int = context("d_model")

        EXAMPLES = ({"n_heads": 4},
                    {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "bias": ["q", "k", "v"]},
                    {"n_heads": 4, "head_dim": 8, "qk_norm": True, "qk_norm_scope": "projection", "bias": True},
                    {"n_heads": 4, "n_kv_heads": 1, "window": 6, "sinks": True, "logit_softcap": 20.0})

        @property
        def head_size(self) -> int:
            """The width E of each head."""
            return self.head_dim or self.dim // self.n_heads

        @property
        def kv_heads(self) -> int:
            return self.n_kv_heads or self.n_heads

        @property
        def biased(self) -> frozenset[str]:
            """Which of q, k, v, o have a bias."""
            return frozenset("qkvo" if self.bias is True else self.bias or ())

        @property
        def widths(self) -> dict[str, int]:
            """Output width of each projection."""
            E, H, K = self.head_size, self.n_heads, self.kv_heads
            return {"q": H * E, "k": K * E, "v": K * E, "o": self.dim}

        # What planning (FLOPs, memory) and RoPE need to know of any attention kind:
        @property
        def rotary_size(self) -> int:
            """Dimensions per head that RoPE sees (the whole head here)."""
            return self.head_size

        @property
        def rotary_origin(self) -> tuple[str, str, str] | None:
            """For RoPE's checks: the key to blame, how ``rotary_size`` comes about and the fix; None while d_model
            is indivisible (``check`` reports that)."""
            if self.head_dim is None and self.dim % self.n_heads:
                return None
            if self.head_dim:
                return "n_heads", f"head_dim = {self.head_dim}", "change head_dim"
            return "n_heads", f"d_model/n_heads = {self.dim}/{self.n_heads} = {self.head_size}", \
                "change n_heads or d_model"

        @property
        def score_dim(self) -> int:
            """Width of the q.k dot product per head."""
            return self.head_size

        @property
        def value_dim(self) -> int:
            """Width of each head's value (and attention output)."""
            return self.head_size

        @property
        def cache_width(self) -> int:
            """Numbers the KV cache stores per position (keys and values of every key/value head)."""
            return 2 * self.kv_heads * self.head_size

        @property
        def n_params(self) -> int:
            E, H, K = self.head_size, self.n_heads, self.kv_heads
            qkv = (H + 2 * K) * E
            norms = (2 * E if self.qk_norm_scope == "head" else (H + K) * E) if self.qk_norm else 0
            biases = sum(w for name, w in self.widths.items() if name in self.biased)
            return self.dim * qkv + H * E * self.dim + biases + norms + (H if self.sinks else 0)

        @property
        def fused(self) -> bool:
            """Plain causal attention: ``scaled_dot_product_attention``'s own kernels apply."""
            return self.window is None and not self.sinks and self.logit_softcap is None

        def saved_bytes(self, T: int, c: int, device: str, rotates: bool) -> AttentionBytes:
            """Plain causal attention runs a fused SDPA kernel: q, k and v (grouped keys and values stay n_kv_heads
            wide: SDPA's ``enable_gqa``), the output and the log-sum-exp; where q is a view of the qkv projection (no
            RoPE, no qk-norm) the whole projection stays alive, and where it is not the output is copied once more
            for the out-projection.  Under CPU autocast everything between the projections runs in fp32 (torch's
            bf16 CPU attention is slower): the qkv projection is cast to fp32 once.  A window, soft-capping and
            sinks take the explicit path, which keeps q, k, v copies, a [T, T] mask, the probabilities
            ([T, T + sinks] per head: all T keys, masked or not; fp32 plus a compute-dtype copy under CUDA autocast)
            and the soft-capped scores; so does SDPA's math path, which the CPU takes for attention dropout
            (computing q, k, v and the probabilities in fp32)."""
            H, s, v, D, K = self.n_heads, self.score_dim, self.value_dim, self.dim, self.kv_heads
            cpu_math = device == "cpu" and self.fused and bool(self.dropout or s != v)
            mask = dropout_mask(c, device)
            per_token = D * c + (D * mask if self.dropout else 0)          # the input, the output dropout's mask
            ac = FP32 if device == "cpu" else c           # CPU autocast casts the qkv projection to fp32
            if self.qk_norm:  # fp32: keeps its input (the qkv buffer, or fp32 copies of q and k), a product, stats
                kept = (H * s + K * s + K * v) * ac if ac == FP32 else (H + K) * s * FP32
                per_token += kept + (H + K) * (s + 1) * FP32
            per_sequence = 0.0
            if not self.fused or cpu_math:
                m = FP32 if cpu_math else c
                per_token += (2 * H * s + H * v) * m + H * v * c              # q, k, v copies; the output copy
                probs = m if m == FP32 or device == "cpu" else FP32 + c
                extra = 1 if self.sinks else 0
                per_sequence = H * T * ((T + extra) * probs + (T * m if self.logit_softcap else 0)
                                        + (T * (mask + m) if self.dropout else 0))
            else:
                new_q = rotates or self.qk_norm                                # rotated or normed q and k are new
                # v (at least) is a view of the qkv buffer, which stays alive (counted above where the fp32
                # qk-norm keeps it)
                views = not (self.qk_norm and ac == FP32)
                per_token += (new_q * (H + K) * s + views * (H * s + K * s + K * v)) * ac
                # the output (and its copy; under CPU autocast an fp32 output and the out-projection's input), lse
                per_token += (H * v * c * (1 + new_q) if ac == c else H * v * (FP32 + c)) + H * FP32
            return AttentionBytes(per_token, per_sequence, T * T if not self.fused else 0)

        def check(self):
            if self.head_dim is None and self.dim % self.n_heads:
                yield ("n_heads",), (f"d_model ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                                     f"choose n_heads among {divisors(self.dim)}, or give head_dim")
            elif self.n_heads % self.kv_heads:
                yield ("n_kv_heads",), (f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                                        f"({self.kv_heads}); choose n_kv_heads among {divisors(self.n_heads)}")

    def __init__(self, spec: "CausalSelfAttention.Spec"):
        super().__init__()
        self.spec = spec
        s = spec
        E = s.head_size
        qkv_bias = s.biased & set("qkv")
        fused_bias = qkv_bias == set("qkv")
        self.qkv = nn.Linear(s.dim, (s.n_heads + 2 * s.kv_heads) * E, bias=fused_bias)
        if not fused_bias:            # some of q, k, v biased: one parameter each (q_bias, k_bias, v_bias)
            for name in sorted(qkv_bias):
                setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(s.widths[name])))
        self.out = mark_residual(nn.Linear(s.n_heads * E, s.dim, bias="o" in s.biased))
        if s.qk_norm:
            per_head = s.qk_norm_scope == "head"
            self.q_norm = nn.RMSNorm(E if per_head else s.n_heads * E, eps=s.qk_norm_eps)
            self.k_norm = nn.RMSNorm(E if per_head else s.kv_heads * E, eps=s.qk_norm_eps)
        if s.sinks:
            self.sinks = nn.Parameter(torch.zeros(s.n_heads))
        self.resid_dropout = nn.Dropout(s.dropout)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> "LayerKVCache":
        """An empty KV cache of this layer for decoding up to ``max_len`` positions."""
        s = self.spec
        return LayerKVCache(batch, s.kv_heads, max_len, s.head_size, device, dtype, window=s.window)

    def reset_parameters(self) -> None:
        for p in self.parameters(recurse=False):     # sinks and separate q/k/v biases start at zero
            nn.init.zeros_(p)

    def forward(self, x_BTD: torch.Tensor, rotary=None, cache=None) -> torch.Tensor:
        s = self.spec
        E = s.head_size
        qkv = self.qkv(x_BTD)
        if on_cpu_autocast(qkv):      # the attention runs in fp32 there (see sdpa): q/k-norm and RoPE too
            qkv = qkv.float()
        q, k, v = qkv.split([s.n_heads * E, s.kv_heads * E, s.kv_heads * E], dim=-1)
        if self.qkv.bias is None and s.biased & set("qkv"):
            q, k, v = (t + getattr(self, f"{n}_bias") if hasattr(self, f"{n}_bias") else t
                       for n, t in zip("qkv", (q, k, v)))
        if s.qk_norm and s.qk_norm_scope == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTE = rearrange(q, "b t (h e) -> b h t e", h=s.n_heads)
        k_BKTE = rearrange(k, "b t (k e) -> b k t e", k=s.kv_heads)
        v_BKTE = rearrange(v, "b t (k e) -> b k t e", k=s.kv_heads)
        if s.qk_norm and s.qk_norm_scope == "head":
            q_BHTE, k_BKTE = self.q_norm(q_BHTE), self.k_norm(k_BKTE)
        scale = None          # SDPA's own 1/sqrt(E), unless the positional encoding scales the softmax
        if rotary is not None:
            q_BHTE, k_BKTE = apply_rotary(q_BHTE, rotary.cos, rotary.sin), apply_rotary(k_BKTE, rotary.cos, rotary.sin)
            if rotary.softmax_factor != 1.0:
                scale = E ** -0.5 * rotary.softmax_factor
        T = x_BTD.shape[1]
        if cache is not None:
            k_BKSE, v_BKSE, q_pos, k_pos = cache.update(k_BKTE, v_BKTE)
        else:
            k_BKSE, v_BKSE, q_pos, k_pos = k_BKTE, v_BKTE, None, None
        gqa = s.kv_heads != s.n_heads       # SDPA shares each K/V head with its group of query heads itself
        p = s.dropout if self.training else 0.0
        if s.fused and q_pos is None:
            y_BHTE = sdpa(q_BHTE, k_BKSE, v_BKSE, dropout_p=p, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            if q_pos is None:
                q_pos = k_pos = torch.arange(T, device=x_BTD.device)
            seen_TS = visible(q_pos, k_pos, s.window)
            if s.fused:
                y_BHTE = sdpa(q_BHTE, k_BKSE, v_BKSE, attn_mask=seen_TS, dropout_p=p, scale=scale, enable_gqa=gqa)
            else:
                if gqa:                 # the written-out path expands the groups
                    rep = s.n_heads // s.kv_heads
                    k_BKSE, v_BKSE = k_BKSE.repeat_interleave(rep, dim=1), v_BKSE.repeat_interleave(rep, dim=1)
                y_BHTE = self.explicit(q_BHTE, k_BKSE, v_BKSE, seen_TS, p, scale)
        return self.resid_dropout(self.out(rearrange(y_BHTE, "b h t e -> b t (h e)")))

    def explicit(self, q_BHTE, k_BHSE, v_BHSE, seen_TS, dropout_p: float, scale: float | None) -> torch.Tensor:
        """softmax(cap(QK^T * scale) masked [, sink]) V, written out (soft-capping and sinks have no fused kernel);
        scale None: 1/sqrt(E)."""
        s = self.spec
        scores_BHTS = (q_BHTE @ k_BHSE.transpose(-1, -2)) * (scale or s.head_size ** -0.5)
        if s.logit_softcap is not None:
            scores_BHTS = s.logit_softcap * torch.tanh(scores_BHTS / s.logit_softcap)
        scores_BHTS = scores_BHTS.masked_fill(~seen_TS, float("-inf"))
        if s.sinks:
            sink_BHT1 = self.sinks.to(scores_BHTS.dtype).view(1, -1, 1, 1).expand(*scores_BHTS.shape[:-1], 1)
            probs_BHTS = torch.cat([scores_BHTS, sink_BHT1], dim=-1).softmax(dim=-1)[..., :-1]
        else:
            probs_BHTS = scores_BHTS.softmax(dim=-1)
        probs_BHTS = F.dropout(probs_BHTS, dropout_p, training=dropout_p > 0)
        return probs_BHTS @ v_BHSE


def on_cpu_autocast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in fp32 under CPU autocast (the result in q's dtype).

    On the CPU, torch's bf16 attention kernels are slower than its fp32 ones while bf16 matmuls are
    faster where the CPU has AMX or AVX512-BF16: at 12 x 4 heads x 64 positions x 32 wide, forward + backward took
    6.7 ms in bf16 (flash) and 2.1 ms (math) against 1.3 ms in fp32 (flash), torch 2.13 on 2 cores (AMX);
    3.7 ms bf16 (flash) against 1.0 ms fp32 on an AVX512-BF16 machine.
    So a CPU bf16 run keeps its projections in bf16 and attends in fp32 (the causal layer casts its qkv
    projection once, so q/k-norm and RoPE run in fp32 too: the fused rms_norm needs input and weight of one dtype).
    """
    if on_cpu_autocast(q):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[T, S]``: which keys each query may attend to (causal, and within ``window`` positions when given)."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
    return seen


class LayerKVCache:
    """Keys and values of one attention layer for incremental decoding.

    With a ``window`` the buffer holds only the last ``window`` positions (the
    queries of a call see those and the call's own keys), so a local layer's
    cache never grows past its window.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype,
                 window: int | None = None):
        self.window = window
        size = max_len if window is None else min(window, max_len)
        self.k = torch.zeros(batch, n_kv_heads, size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len
        self.pos = 0          # positions seen so far
        self.held = 0         # positions in the buffer (the last ``held`` of them)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Add this call's keys/values; ``(keys, values, query positions, key positions)`` to attend with."""
        T = k.shape[2]
        start, end = self.pos, self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        q_pos = torch.arange(start, end, device=k.device)
        if self.window is None:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            self.pos = self.held = end
            return self.k[:, :, :end], self.v[:, :, :end], q_pos, torch.arange(end, device=k.device)
        keys = torch.cat([self.k[:, :, :self.held], k], dim=2)
        values = torch.cat([self.v[:, :, :self.held], v], dim=2)
        k_pos = torch.arange(start - self.held, end, device=k.device)
        keep = min(self.k.shape[2], keys.shape[2])
        self.k[:, :, :keep] = keys[:, :, -keep:]
        self.v[:, :, :keep] = values[:, :, -keep:]
        self.pos, self.held = end, keep
        return keys, values, q_pos, k_pos
