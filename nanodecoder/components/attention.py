"""Causal self-attention (``kind: causal``): MHA, GQA and MQA in one class.

Queries have ``n_heads`` heads, keys and values ``n_kv_heads`` heads that are
shared by groups of query heads.  The layer is composed (``attention_kernels``):
projections -> q/k transforms (QK-norm, RoPE; the Spec's ``transforms``) -> one
score kernel chosen at construction (the Spec's ``kernel_for``: fused SDPA for
plain causal attention; for windows, chunks, sinks and soft-capping the explicit
product, or FlexAttention on CUDA) -> the output projection.  With a KV cache
the layer appends this call's keys and values and attends over everything cached
so far (the last window or chunk of them).

Shapes: B batch, T positions, D d_model, H query heads, K key/value heads,
E head dimension.
"""
from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

from ..config.declare import Kind, context, declared, divisors, param
from .attention_kernels import (SDPA, ByDevice, CPUFloat32, Explicit, Flex, Kernel, Ledger, QKNorm, QueryTemperature,
                                Rotate, Transform, visible)
from .base import Component, mark_residual
from .contracts import FP32, AttentionBytes, AttentionKind, dropout_mask, mean_keys

__all__ = ["CausalSelfAttention", "LayerKVCache", "visible"]


class CausalSelfAttention(Component):
    """Causal self-attention, MHA, GQA (n_kv_heads < n_heads) or MQA (n_kv_heads: 1): projections, q/k
    transforms, a score kernel."""

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
        qk_norm_weight: bool = param(True, doc="Whether the q/k RMSNorms have a learned weight; false: x / rms(x) "
                                               "only, no parameter (Llama 4's L2 norm).")
        query_scale_floor: int | None = param(
            None, doc="Scale the queries by 1 + query_scale * ln(1 + floor((position + 1) / query_scale_floor)), so "
                      "attention sharpens with distance (Llama 4's attn_temperature_tuning on its NoPE layers, "
                      "floor_scale 8192; Nakanishi 2025, arXiv 2501.19399); null: off.", minimum=1)
        query_scale: float = param(0.1, doc="The slope of query_scale_floor's scaling (Llama 4's attn_scale).",
                                   minimum=0)
        qk_norm_eps: float = param(1e-6, doc="Epsilon of the q/k RMSNorms (models use their rms_norm_eps: Qwen3 "
                                             "1e-6, OLMoE 1e-5).", exclusive_minimum=0)
        window: int | None = param(None, doc="Sliding-window attention: each query sees itself and the window - 1 "
                                             "positions before it (null: every earlier position); a layer's KV cache "
                                             "then holds at most window positions. Set it per layer with overrides "
                                             "for local/global patterns.", minimum=1)
        chunk: int | None = param(None, doc="Chunked attention (Llama 4's attention_chunk_size): the positions "
                                            "are cut into chunks of chunk positions and a query sees only the "
                                            "earlier keys of its own chunk; a layer's KV cache then holds at most "
                                            "chunk positions (null: off). Set it per layer with overrides.",
                                        minimum=1)
        sinks: bool = param(False, doc="A learned logit per head that joins every softmax's denominator (attention "
                                       "sinks, GPT-OSS): a query may put weight on nothing.")
        logit_softcap: float | None = param(None, doc="Soft-cap the attention scores: cap * tanh(score / cap) before "
                                                      "the softmax (Gemma 2: 50); null: off.", exclusive_minimum=0)
        dropout: float = param(0.0, doc="Attention and output dropout.", minimum=0, maximum=1)
        dim: int = context("d_model")

        EXAMPLES = ({"n_heads": 4},
                    {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "bias": ["q", "k", "v"]},
                    {"n_heads": 4, "head_dim": 8, "qk_norm": True, "qk_norm_scope": "projection", "bias": True},
                    {"n_heads": 4, "n_kv_heads": 1, "window": 6, "sinks": True, "logit_softcap": 20.0},
                    {"n_heads": 4, "n_kv_heads": 2, "chunk": 5, "qk_norm": True, "qk_norm_weight": False},
                    {"n_heads": 4, "query_scale_floor": 3, "query_scale": 0.5})

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
        def value_width(self) -> int:
            """Width of the values (every key/value head's) a value embedding adds to."""
            return self.kv_heads * self.head_size

        @property
        def n_params(self) -> int:
            E, H, K = self.head_size, self.n_heads, self.kv_heads
            qkv = (H + 2 * K) * E
            norms = (2 * E if self.qk_norm_scope == "head" else (H + K) * E) if self.qk_norm and self.qk_norm_weight \
                else 0
            biases = sum(w for name, w in self.widths.items() if name in self.biased)
            return self.dim * qkv + H * E * self.dim + biases + norms + (H if self.sinks else 0)

        @property
        def fused(self) -> bool:
            """Plain causal attention: ``scaled_dot_product_attention``'s own kernels apply."""
            return self.window is None and self.chunk is None and not self.sinks and self.logit_softcap is None

        @property
        def span(self) -> int | None:
            """Most keys a query sees (and its KV cache holds): the window, the chunk, the smaller of both, or None
            (every earlier position)."""
            return min((w for w in (self.window, self.chunk) if w is not None), default=None)

        def score_flops(self, context: int) -> float:
            """Scores and weighted values per token: position t sees min(t + 1, window) keys, counted from the
            start of its chunk where ``chunk`` is set."""
            if self.chunk is None or self.chunk >= context:
                keys = mean_keys(context, self.window)
            else:
                whole, rest = divmod(context, self.chunk)
                keys = (whole * self.chunk * mean_keys(self.chunk, self.window)
                        + (rest * mean_keys(rest, self.window) if rest else 0)) / context
            return 2 * self.n_heads * (self.score_dim + self.value_dim) * keys

        def cache_positions(self, context: int) -> int:
            return min(context, self.span or context)

        def transforms(self) -> tuple[Transform, ...]:
            """What q and k pass through between the projections and the kernel, in order (a plug-in kind adds its
            own here)."""
            norm = (QKNorm("heads" if self.qk_norm_scope == "head" else "projection", self.qk_norm_weight),) \
                if self.qk_norm else ()
            scaled = (QueryTemperature(self.query_scale_floor, self.query_scale),) if self.query_scale_floor else ()
            return (*norm, Rotate(), *scaled)

        def kernel_for(self, device: str) -> type[Kernel]:
            """The score kernel on ``device``: fused SDPA for plain causal attention; FlexAttention on CUDA for
            windows, chunks, sinks and soft-capping (without attention dropout, which flex lacks); else the
            explicit product (torch has no FlexAttention backward on the CPU)."""
            if self.fused:
                return SDPA
            return Flex if device == "cuda" and not self.dropout else Explicit

        def saved_bytes(self, T: int, c: int, device: str, rotates: bool) -> AttentionBytes:
            """The sum of the parts: the input (and the output dropout's mask), then what each transform and the
            kernel on ``device`` keep (``attention_kernels.Ledger``).  The projections leave q, k and v as views of
            one buffer, cast to fp32 on the CPU (``CPUFloat32``); a partial bias makes its tensor new."""
            ledger = Ledger(T, c, device, rotates, {"q": self.n_heads * self.score_dim,
                                                    "k": self.kv_heads * self.score_dim,
                                                    "v": self.kv_heads * self.value_dim},
                            FP32 if device == "cpu" else c)
            ledger.per_token += self.dim * c + (self.dim * dropout_mask(c, device) if self.dropout else 0)
            partial = self.biased & set("qkv")
            if partial != set("qkv"):
                ledger.replace(*sorted(partial))
            for part in sorted(self.transforms(), key=lambda t: t.stage != "projection"):
                part.plan(ledger, self)
            self.kernel_for(device).plan(ledger, self)
            return ledger.total()

        def check(self):
            if self.head_dim is None and self.dim % self.n_heads:
                yield ("n_heads",), (f"d_model ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                                     f"choose n_heads among {divisors(self.dim)}, or give head_dim")
            elif self.n_heads % self.kv_heads:
                yield ("n_kv_heads",), (f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                                        f"({self.kv_heads}); choose n_kv_heads among {divisors(self.n_heads)}")
            if not self.qk_norm_weight and not self.qk_norm:
                yield ("qk_norm_weight",), ("qk_norm_weight: false needs qk_norm: true; set qk_norm or drop "
                                            "qk_norm_weight")

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
            affine = s.qk_norm_weight
            self.q_norm = nn.RMSNorm(E if per_head else s.n_heads * E, eps=s.qk_norm_eps, elementwise_affine=affine)
            self.k_norm = nn.RMSNorm(E if per_head else s.kv_heads * E, eps=s.qk_norm_eps, elementwise_affine=affine)
        if s.sinks:
            self.sinks = nn.Parameter(torch.zeros(s.n_heads))
        self.resid_dropout = nn.Dropout(s.dropout)
        transforms = sorted(s.transforms(), key=lambda t: t.stage != "projection")
        self.transforms = tuple(t for t in transforms if t.stage == "projection"), \
            tuple(t for t in transforms if t.stage != "projection")
        self.kernel = self.score_kernel()

    def score_kernel(self) -> CPUFloat32:
        """The kernel, chosen once: the spec's kernel on each device type (FlexAttention on CUDA where the spec
        picks it), inside the CPU fp32 policy (which attends in fp32 with SDPA only; see ``CPUFloat32``)."""
        s = self.spec
        mods = {"window": s.window, "chunk": s.chunk, "softcap": s.logit_softcap}
        default, cuda = s.kernel_for("cpu"), s.kernel_for("cuda")
        inner = default(**mods) if cuda is default else ByDevice(cuda(**mods), default(**mods))
        return CPUFloat32(inner, fp32=default is SDPA)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> "LayerKVCache":
        """An empty KV cache of this layer for decoding up to ``max_len`` positions."""
        s = self.spec
        return LayerKVCache(batch, s.kv_heads, max_len, s.head_size, device, dtype, window=s.span)

    def reset_parameters(self) -> None:
        for p in self.parameters(recurse=False):     # sinks and separate q/k/v biases start at zero
            nn.init.zeros_(p)

    def forward(self, x_BTD: torch.Tensor, rotary=None, cache=None, values=None) -> torch.Tensor:
        """``values``: a function of the values [B, T, value_width] that gives those attended (a value embedding
        mixed in: ``model.value_embeddings``), or None."""
        s = self.spec
        q, k, v = self.project(x_BTD)
        if values is not None:
            v = values(v)
        start = cache.pos if cache is not None else 0        # the position of this call's first token
        q, k, factor = self.transform(self.transforms[0], q, k, rotary, start)
        q_BHTE = rearrange(q, "b t (h e) -> b h t e", h=s.n_heads)
        k_BKTE, v_BKTE = (rearrange(t, "b t (k e) -> b k t e", k=s.kv_heads) for t in (k, v))
        q_BHTE, k_BKTE, f = self.transform(self.transforms[1], q_BHTE, k_BKTE, rotary, start)
        pos = None
        if cache is not None:
            k_BKTE, v_BKTE, *pos = cache.update(k_BKTE, v_BKTE)
        scale = None if factor * f == 1.0 else s.head_size ** -0.5 * factor * f     # None: SDPA's own 1/sqrt(E)
        y_BHTE = self.kernel(q_BHTE, k_BKTE, v_BKTE, pos, scale, s.dropout if self.training else 0.0,
                             self.sinks if s.sinks else None)
        return self.resid_dropout(self.out(rearrange(y_BHTE, "b h t e -> b t (h e)")))

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v, [B, T, width] views of one projection (cast by the CPU policy); a partial bias is added to
        its own."""
        s = self.spec
        q, k, v = self.kernel.prepare(self.qkv(x_BTD)).split([s.widths["q"], s.widths["k"], s.widths["v"]], dim=-1)
        if self.qkv.bias is None and s.biased & set("qkv"):
            q, k, v = (t + getattr(self, f"{n}_bias") if hasattr(self, f"{n}_bias") else t
                       for n, t in zip("qkv", (q, k, v)))
        return q, k, v

    def transform(self, transforms, q, k, rotary, start: int = 0):
        """``q, k`` through ``transforms`` in order, and the product of their softmax factors (a transform that
        says ``positional = True`` also gets the position of the call's first token)."""
        factor = 1.0
        for t in transforms:
            q, k, f = t(self, q, k, rotary, start=start) if t.positional else t(self, q, k, rotary)
            factor *= f
        return q, k, factor


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
