"""Multi-head latent attention (``kind: mla``; DeepSeek-V2, arXiv 2405.04434, section 2.1; DeepSeek-V3).

Keys and values come from one low-rank latent per position, ``c = norm(x W_DKV)``
of width ``kv_lora_rank``, up-projected per head (``k_nope = c W_UK``,
``v = c W_UV``); queries likewise from ``norm(x W_DQ)`` of width ``q_lora_rank``
(or straight from x when it is null).  RoPE cannot pass through the latent, so
each head also has a decoupled rotary part: ``qk_rope_head_dim`` query
dimensions per head and one rotary key shared by all heads, taken from x
beside the latent.  Scores are ``(q_nope . k_nope + q_rope . k_rope) * scale``
with ``scale = softmax_factor / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.

The KV cache stores only ``c`` and the rotated ``k_rope`` per position
(``kv_lora_rank + qk_rope_head_dim`` numbers instead of ``2 * heads * head
dims``).  Decoding attends in the latent space: W_UK is absorbed into the
query and W_UV applied after the weighted sum (the paper's 2.1.2), so cached
positions are never up-projected.

Shapes: B batch, T positions, S key positions, D d_model, H heads, N nope and
R rope dims per head, V value dims per head, C the latent (kv_lora_rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config.declare import Kind, context, declared, param
from .attention_kernels import SDPA, CPUFloat32, Kernel, Ledger, Rotate, visible
from .base import Component, mark_residual
from .contracts import FP32, AttentionBytes, AttentionKind, dropout_mask
from .norms import RMSNorm


def _rmsnorm(width: int, eps: float) -> RMSNorm:
    return RMSNorm(RMSNorm.Spec(kind="rmsnorm", impl=RMSNorm, category="norm", eps=eps, dim=width))


class MultiHeadLatentAttention(Component):
    """Multi-head latent attention: low-rank compressed queries and keys/values, a decoupled RoPE part, and a
    KV cache of the latent."""

    @declared
    class Spec(AttentionKind):
        n_heads: int = param(doc="Number of attention heads (DeepSeek-V3: 128).", minimum=1)
        q_lora_rank: int | None = param(None, doc="Width of the compressed query latent (DeepSeek-V3: 1536); "
                                                  "null: queries are projected from the input directly "
                                                  "(DeepSeek-V2-Lite).", minimum=1)
        kv_lora_rank: int = param(doc="Width of the compressed key/value latent that the KV cache stores "
                                      "(DeepSeek-V3: 512).", minimum=1)
        qk_nope_head_dim: int = param(doc="Query/key dimensions per head without position information, "
                                          "up-projected from the latent (DeepSeek-V3: 128).", minimum=1)
        qk_rope_head_dim: int = param(doc="Decoupled rotary query/key dimensions per head; the rotary key is one "
                                          "per position, shared by every head (DeepSeek-V3: 64).", minimum=2)
        v_head_dim: int = param(doc="Value dimensions per head (DeepSeek-V3: 128).", minimum=1)
        bias: bool = param(False, doc="Biases on the down-projections from the input and on the output "
                                      "projection (DeepSeek's attention_bias); the up-projections have none.")
        latent_norm_eps: float = param(1e-6, doc="Epsilon of the RMSNorms on the query and key/value latents.",
                                       exclusive_minimum=0)
        dropout: float = param(0.0, doc="Attention and output dropout.", minimum=0, maximum=1)
        dim: int = context("d_model")

        EXAMPLES = ({"n_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                     "v_head_dim": 8},
                    {"n_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12,
                     "bias": True})

        @property
        def score_dim(self) -> int:
            return self.qk_nope_head_dim + self.qk_rope_head_dim

        @property
        def value_dim(self) -> int:
            return self.v_head_dim

        @property
        def rotary_size(self) -> int:
            return self.qk_rope_head_dim

        @property
        def rotary_origin(self) -> tuple[str, str, str]:
            return "qk_rope_head_dim", f"qk_rope_head_dim = {self.qk_rope_head_dim}", "change qk_rope_head_dim"

        @property
        def cache_width(self) -> int:
            """Numbers cached per position: the latent and the shared rotary key."""
            return self.kv_lora_rank + self.qk_rope_head_dim

        def saved_bytes(self, T: int, c: int, device: str, rotates: bool) -> AttentionBytes:
            """The sum of the parts: the input (and the output dropout's mask), the latents' norms (fp32 input,
            product and statistics) and the up-projections' inputs, then what the latent kernel keeps
            (``LatentKernel.plan``); RoPE keeps nothing of its own."""
            ledger = Ledger(T, c, device, rotates, {"q": self.n_heads * self.score_dim,
                                                    "k": self.n_heads * self.score_dim,
                                                    "v": self.n_heads * self.value_dim}, c)
            ledger.per_token += self.dim * c + (self.dim * dropout_mask(c, device) if self.dropout else 0)
            ledger.per_token += sum((2 * w + 1) * FP32 + w * c for w in (self.q_lora_rank, self.kv_lora_rank) if w)
            LatentKernel.plan(ledger, self)
            return ledger.total()

        @property
        def n_params(self) -> int:
            D, H, C, R = self.dim, self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
            b = 1 if self.bias else 0
            q_width = H * self.score_dim
            q = (D * self.q_lora_rank + b * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_width
                 if self.q_lora_rank else D * q_width)
            kv = D * (C + R) + b * (C + R) + C + C * H * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + H * self.v_head_dim * D + b * D

    def __init__(self, spec: "MultiHeadLatentAttention.Spec"):
        super().__init__()
        self.spec = s = spec
        H = s.n_heads
        if s.q_lora_rank:
            self.q_down = nn.Linear(s.dim, s.q_lora_rank, bias=s.bias)
            self.q_norm = _rmsnorm(s.q_lora_rank, s.latent_norm_eps)
            self.q_up = nn.Linear(s.q_lora_rank, H * s.score_dim, bias=False)
        else:
            self.q_proj = nn.Linear(s.dim, H * s.score_dim, bias=False)
        self.kv_down = nn.Linear(s.dim, s.kv_lora_rank + s.qk_rope_head_dim, bias=s.bias)
        self.kv_norm = _rmsnorm(s.kv_lora_rank, s.latent_norm_eps)
        self.kv_up = nn.Linear(s.kv_lora_rank, H * (s.qk_nope_head_dim + s.v_head_dim), bias=False)
        self.out = mark_residual(nn.Linear(H * s.v_head_dim, s.dim, bias=s.bias))
        self.resid_dropout = nn.Dropout(s.dropout)
        self.rotate = Rotate()
        self.kernel = LatentKernel(s.n_heads, s.qk_nope_head_dim, s.v_head_dim)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> "LatentKVCache":
        s = self.spec
        return LatentKVCache(batch, max_len, s.kv_lora_rank, s.qk_rope_head_dim, device, dtype)

    def queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        q = self.q_up(self.q_norm(self.q_down(x_BTD))) if self.spec.q_lora_rank else self.q_proj(x_BTD)
        return rearrange(q, "b t (h e) -> b h t e", h=self.spec.n_heads)

    def forward(self, x_BTD: torch.Tensor, rotary=None, cache=None) -> torch.Tensor:
        s = self.spec
        q_nope_BHTN, q_rope_BHTR = self.queries(x_BTD).split([s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        c_BTC, k_rope_BTR = self.kv_down(x_BTD).split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        c_BTC = self.kv_norm(c_BTC)
        q_rope_BHTR, k_rope_B1TR, factor = self.rotate(self, q_rope_BHTR, k_rope_BTR.unsqueeze(1), rotary)
        pos = None
        if cache is not None:
            c_BTC, k_rope_BTR, *pos = cache.update(c_BTC, k_rope_B1TR.squeeze(1))
            k_rope_B1TR = k_rope_BTR.unsqueeze(1)
        y_BHTV = self.kernel(q_nope_BHTN, q_rope_BHTR, c_BTC, k_rope_B1TR, self.kv_up, pos,
                             s.score_dim ** -0.5 * factor, s.dropout if self.training else 0.0)
        return self.resid_dropout(self.out(rearrange(y_BHTV, "b h t v -> b t (h v)")))


class LatentKernel(Kernel):
    """MLA's score kernel over the latent ``c`` and the shared rotary key: a whole sequence up-projects every
    position's keys and values and runs one fused causal SDPA (in the CPU fp32 policy); a call through the cache
    attends in the latent space (the paper's 2.1.2: q_nope W_UK^T scores against c directly, and W_UV applies after
    the weighted sum of latents, so nothing cached is up-projected)."""

    def __init__(self, n_heads: int, nope: int, value: int):
        super().__init__()
        self.n_heads, self.nope, self.value = n_heads, nope, value
        self.sdpa = CPUFloat32(SDPA())

    def forward(self, q_nope_BHTN, q_rope_BHTR, c_BSC, k_rope_B1SR, kv_up: nn.Linear, pos, scale: float,
                dropout_p: float):
        if pos is None:
            return self.expanded(q_nope_BHTN, q_rope_BHTR, c_BSC, k_rope_B1SR, kv_up, scale, dropout_p)
        return self.absorbed(q_nope_BHTN, q_rope_BHTR, c_BSC, k_rope_B1SR.squeeze(1), kv_up.weight,
                             visible(*pos, None), scale, dropout_p)

    def expanded(self, q_nope_BHTN, q_rope_BHTR, c_BTC, k_rope_B1TR, kv_up, scale, dropout_p):
        kv_BHTF = rearrange(kv_up(c_BTC), "b t (h f) -> b h t f", h=self.n_heads)
        k_nope_BHTN, v_BHTV = kv_BHTF.split([self.nope, self.value], dim=-1)
        q_BHTE = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        k_BHTE = torch.cat([k_nope_BHTN, k_rope_B1TR.expand(-1, self.n_heads, -1, -1)], dim=-1)
        return self.sdpa(q_BHTE, k_BHTE, v_BHTV, None, scale, dropout_p)

    def absorbed(self, q_nope_BHTN, q_rope_BHTR, c_BSC, k_rope_BSR, w_up, seen_TS, scale, dropout_p):
        w_HFC = rearrange(w_up, "(h f) c -> h f c", h=self.n_heads)
        w_uk_HNC, w_uv_HVC = w_HFC.split([self.nope, self.value], dim=1)
        q_lat_BHTC = torch.einsum("bhtn,hnc->bhtc", q_nope_BHTN, w_uk_HNC)
        scores_BHTS = (torch.einsum("bhtc,bsc->bhts", q_lat_BHTC, c_BSC) +
                       torch.einsum("bhtr,bsr->bhts", q_rope_BHTR, k_rope_BSR)) * scale
        probs_BHTS = scores_BHTS.masked_fill(~seen_TS, float("-inf")).softmax(dim=-1)
        probs_BHTS = F.dropout(probs_BHTS, dropout_p, training=dropout_p > 0)
        out_lat_BHTC = torch.einsum("bhts,bsc->bhtc", probs_BHTS, c_BSC)
        return torch.einsum("bhtc,hvc->bhtv", out_lat_BHTC, w_uv_HVC)

    @staticmethod
    def plan(ledger, spec):
        """The expanded path trains: the up-projected keys and values form the buffer that stays alive, beside
        the (rotated) q and k, the output (and its copy) and the log-sum-exp of the fused SDPA.  The CPU takes
        SDPA's math path for dropout or values narrower than the scores (``SDPA.plan``); under CPU autocast SDPA
        runs on fp32 copies of q, k and v (``CPUFloat32``)."""
        H, s, v, c, rotates = spec.n_heads, spec.score_dim, spec.value_dim, ledger.c, ledger.rotates
        if ledger.device == "cpu" and bool(spec.dropout or s != v):
            SDPA.plan(ledger, spec)
        elif ledger.device == "cpu" and c < FP32:
            ledger.per_token += (H * s + H * (s + v)) * FP32 + H * v * (FP32 + c) + H * FP32
        else:
            ledger.per_token += (rotates * 2 * H * s + H * (s + v)) * c + H * v * c * (1 + rotates) + H * FP32


class LatentKVCache:
    """MLA's cache for incremental decoding: per position the normalised latent ``c`` and the rotated shared
    key ``k_rope``."""

    def __init__(self, batch: int, max_len: int, latent: int, rope_dim: int, device, dtype):
        self.c = torch.zeros(batch, max_len, latent, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, c_BTC: torch.Tensor, k_rope_BTR: torch.Tensor):
        """Add this call's positions; ``(latents, rotary keys, query positions, key positions)`` to attend with."""
        start, end = self.pos, self.pos + c_BTC.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.c[:, start:end] = c_BTC
        self.k_rope[:, start:end] = k_rope_BTR
        self.pos = end
        device = c_BTC.device
        return self.c[:, :end], self.k_rope[:, :end], torch.arange(start, end, device=device), \
            torch.arange(end, device=device)
