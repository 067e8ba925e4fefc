"""The parts attention is composed of: q/k transforms, score kernels, and the ledger that plans what they keep.

An attention layer projects its input to q, k and v, passes q and k through its **transforms** (a QK-norm, RoPE,
a plug-in's per-head scaling...), and hands them to one **score kernel**, chosen once at construction, that
computes softmax(scores(q, k)) v:

* :class:`SDPA` -- ``F.scaled_dot_product_attention``: ``is_causal`` over a whole sequence (flash / memory-efficient
  kernels), an explicit mask for a call through a KV cache;
* :class:`Explicit` -- the product written out, for what SDPA cannot do: soft-capped scores, sinks, windows and
  chunks; it keeps the [T, S] probabilities of every layer;
* :class:`Flex` -- ``torch.nn.attention.flex_attention`` (compiled) with a block mask and a score_mod: windows,
  chunks, soft-capping and sinks without [T, S] probabilities; CUDA only (torch has no FlexAttention backward on
  the CPU), so a model holds a :class:`ByDevice` choice of Flex on CUDA and Explicit elsewhere;
* :class:`CPUFloat32` -- the CPU precision policy as a wrapper of another kernel (see its docstring).

Planning never builds a module: a kind's ``Spec`` names its transforms and its kernel class for a device, and each
part adds what it saves for the backward to a :class:`Ledger` (``plan(ledger)``); the Spec's ``saved_bytes`` is
the ledger's total.  So a new score rule is a transform or a kernel, and brings its own planning.

Shapes: B batch, T query positions, S key positions, H query heads, K key/value heads, E head dimension.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .contracts import FP32, AttentionBytes, dropout_mask
from .positional import apply_rotary


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Ledger:
    """What one attention layer keeps for the backward, walked part by part, and where q, k and v stand.

    ``widths``: numbers per token of q, k and v; each of them is either a view of the projection buffer (all of
    q, k and v, ``sum(widths)`` numbers of ``dtype`` bytes: saving any view keeps the whole buffer alive, counted
    once) or a tensor of its own, head-major ([B, H, T, E] in memory) or token-major ([B, T, H, E]).
    """
    T: int                        # positions of a sequence
    c: int                        # compute dtype bytes
    device: str                   # "cpu" or "cuda"
    rotates: bool                 # the model's positional encoding rotates q and k
    widths: dict[str, int]        # numbers per token of q, k, v
    dtype: int                    # bytes per number of q, k, v after the projections
    per_token: float = 0.0
    per_sequence: float = 0.0
    per_batch: float = 0.0
    views: set[str] = field(default_factory=lambda: {"q", "k", "v"})
    head_major: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)        # tensors of their own already counted
    buffer_kept: bool = False

    def keep(self, *names: str) -> None:
        """A part saves q, k or v as they are (each counted once)."""
        for n in names:
            if n in self.views:
                if not self.buffer_kept:
                    self.per_token += sum(self.widths.values()) * self.dtype
                    self.buffer_kept = True
            elif n not in self.kept:
                self.per_token += self.widths[n] * self.dtype
                self.kept.add(n)

    def replace(self, *names: str, head_major: bool | None = None) -> None:
        """A part hands on new q, k or v tensors (``head_major`` None: the layout of its input)."""
        for n in names:
            was = n in self.head_major
            self.views.discard(n)
            self.kept.discard(n)
            self.head_major.discard(n)
            if (was if head_major is None else head_major):
                self.head_major.add(n)

    def total(self) -> AttentionBytes:
        return AttentionBytes(self.per_token, self.per_sequence, self.per_batch)


# ---------------------------------------------------------------------------------------------- transforms
class Transform:
    """A change of q and k between the projections and the kernel.  ``stage``: ``"projection"`` (on the
    [B, T, width] projections) or ``"heads"`` (on [B, H, T, E] heads).  ``__call__(attn, q, k, rotary)`` returns
    ``(q, k, softmax_factor)``; ``plan(ledger, spec)`` adds what it saves.  A transform with ``positional = True``
    is called with ``start=``, the position of the call's first token (0 for a whole sequence, the cached
    positions through a KV cache)."""
    stage = "heads"
    positional = False

    def __call__(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, rotary):  # pragma: no cover
        raise NotImplementedError

    def plan(self, ledger: Ledger, spec) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class QKNorm(Transform):
    """RMS-normalise q and k with the layer's ``q_norm`` / ``k_norm`` (``nn.RMSNorm``, weighted or not), over each
    head (``stage`` heads) or over the whole projections (``stage`` projection)."""
    stage: str = "heads"
    weight: bool = True

    def __call__(self, attn, q, k, rotary):
        return attn.q_norm(q), attn.k_norm(k), 1.0

    def plan(self, ledger, spec):
        """Its input (fp32; a copy under CUDA autocast), ``x * rstd`` for the weight's gradient, the statistics."""
        H, K, E = spec.n_heads, spec.kv_heads, spec.score_dim
        if ledger.dtype == FP32:
            ledger.keep("q", "k")
        else:                                         # autocast runs rms_norm on fp32 copies
            ledger.per_token += (H + K) * E * FP32
        stats = H + K if self.stage == "heads" else 2
        ledger.per_token += ((H + K) * E * self.weight + stats) * FP32
        ledger.replace("q", "k", head_major=self.stage == "heads")


@dataclass(frozen=True)
class Rotate(Transform):
    """RoPE on q and k, and the positional encoding's softmax factor (YaRN's mscale); a no-op without one."""

    def __call__(self, attn, q, k, rotary):
        if rotary is None:
            return q, k, 1.0
        return (apply_rotary(q, rotary.cos, rotary.sin), apply_rotary(k, rotary.cos, rotary.sin),
                rotary.softmax_factor)

    def plan(self, ledger, spec):
        """Nothing of its own (cos and sin are shared by every layer); rotated q and k are new, head-major."""
        if ledger.rotates:
            ledger.replace("q", "k", head_major=True)


@dataclass(frozen=True)
class QueryTemperature(Transform):
    """Queries scaled by ``1 + slope * ln(1 + floor((t + 1) / floor_scale))`` at position t: Llama 4's
    attn_temperature_tuning (its NoPE layers), which sharpens attention as the context grows (arXiv 2501.19399).
    The product keeps only the [T] scales for the backward."""
    floor_scale: int
    slope: float
    positional = True

    def __call__(self, attn, q, k, rotary, *, start: int = 0):
        pos = torch.arange(start, start + q.shape[-2], device=q.device, dtype=torch.float32)
        scales = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.slope + 1.0
        return (q * scales.view(-1, 1)).to(q.dtype), k, 1.0

    def plan(self, ledger, spec):
        ledger.per_batch += ledger.T * FP32
        ledger.replace("q", head_major=True)


# ---------------------------------------------------------------------------------------------- kernels
class Kernel(nn.Module):
    """softmax(scores(q, k)) v: ``forward(q_BHTE, k_BKSE, v_BKSE, pos, scale, dropout_p, sinks) -> y_BHTE``.

    ``pos``: None for a whole sequence from position 0, else ``(q_pos, k_pos)`` of a call through a KV cache;
    ``scale`` None: 1/sqrt(E); ``sinks``: the layer's per-head sink logits, or None.  A kernel holds no
    parameters (the layer owns them, so checkpoints do not depend on the kernel).  ``plan(ledger, spec)`` adds what
    the kernel (and the out-projection's input, whose layout it decides) saves."""

    def __init__(self, window: int | None = None, chunk: int | None = None, softcap: float | None = None):
        super().__init__()
        self.window, self.chunk, self.softcap = window, chunk, softcap

    @staticmethod
    def plan(ledger: Ledger, spec) -> None:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in (("window", self.window), ("chunk", self.chunk),
                                                  ("softcap", self.softcap)) if v is not None)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """``[T, S]``: which keys each query may attend to (causal, within ``window`` positions and inside the query's
    chunk of ``chunk`` positions when given)."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
    if chunk is not None:
        seen = seen & (k_pos[None, :] // chunk == q_pos[:, None] // chunk)
    return seen


def positions(pos, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if pos is not None:
        return pos
    q_pos = torch.arange(T, device=device)
    return q_pos, q_pos


class SDPA(Kernel):
    """``F.scaled_dot_product_attention``: causal over a whole sequence, masked by positions through a cache;
    grouped keys and values stay n_kv_heads wide (``enable_gqa``)."""

    def forward(self, q_BHTE, k_BKSE, v_BKSE, pos=None, scale=None, dropout_p=0.0, sinks=None):
        gqa = k_BKSE.shape[1] != q_BHTE.shape[1]
        if pos is None and self.window is None and self.chunk is None:
            return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, dropout_p=dropout_p, is_causal=True,
                                                  scale=scale, enable_gqa=gqa)
        seen_TS = visible(*positions(pos, q_BHTE.shape[2], q_BHTE.device), self.window, self.chunk)
        return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=seen_TS, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=gqa)

    @staticmethod
    def plan(ledger, spec):
        """The fused kernels keep q, k, v, the output and the log-sum-exp; the output has q's layout, so a
        head-major q costs a copy for the out-projection.  The CPU takes the math path for attention dropout or
        values narrower than the scores: fp32 copies of q, k, v, the probabilities (and dropout's mask)."""
        H, s, v, T, c = spec.n_heads, spec.score_dim, spec.value_dim, ledger.T, ledger.c
        if ledger.device == "cpu" and (spec.dropout or s != v):
            mask = dropout_mask(c, "cpu")
            ledger.per_token += (2 * H * s + H * v) * FP32 + H * v * c
            ledger.per_sequence += H * T * (T * FP32 + (T * (mask + FP32) if spec.dropout else 0))
            return
        ledger.keep("q", "k", "v")
        if ledger.dtype != c:                  # fp32 output (CPU policy), the out-projection's cast copy
            ledger.per_token += H * v * (FP32 + c)
        else:
            ledger.per_token += H * v * c * (1 + ("q" in ledger.head_major))
        ledger.per_token += H * FP32                                                  # log-sum-exp


class Explicit(Kernel):
    """softmax(cap(q k^T * scale), masked [, sink]) v written out: soft-capping and sinks, windows and chunks,
    grouped heads expanded."""

    def forward(self, q_BHTE, k_BKSE, v_BKSE, pos=None, scale=None, dropout_p=0.0, sinks=None):
        H, K = q_BHTE.shape[1], k_BKSE.shape[1]
        seen_TS = visible(*positions(pos, q_BHTE.shape[2], q_BHTE.device), self.window, self.chunk)
        if K != H:
            k_BKSE, v_BKSE = k_BKSE.repeat_interleave(H // K, dim=1), v_BKSE.repeat_interleave(H // K, dim=1)
        scores_BHTS = (q_BHTE @ k_BKSE.transpose(-1, -2)) * (scale or q_BHTE.shape[-1] ** -0.5)
        if self.softcap is not None:
            scores_BHTS = self.softcap * torch.tanh(scores_BHTS / self.softcap)
        scores_BHTS = scores_BHTS.masked_fill(~seen_TS, float("-inf"))
        if sinks is not None:
            sink_BHT1 = sinks.to(scores_BHTS.dtype).view(1, -1, 1, 1).expand(*scores_BHTS.shape[:-1], 1)
            probs_BHTS = torch.cat([scores_BHTS, sink_BHT1], dim=-1).softmax(dim=-1)[..., :-1]
        else:
            probs_BHTS = scores_BHTS.softmax(dim=-1)
        probs_BHTS = F.dropout(probs_BHTS, dropout_p, training=dropout_p > 0)
        return probs_BHTS @ v_BKSE

    @staticmethod
    def plan(ledger, spec):
        """H-wide q, k and v as the matmuls see them (bf16 casts under CPU autocast), the output's copy for the
        out-projection, and per sequence the probabilities ([T, T + sinks] per head: fp32 plus a compute-dtype copy
        under CUDA autocast), the soft-capped scores and dropout's mask; one [T, T] mask per call."""
        H, s, v, T, c = spec.n_heads, spec.score_dim, spec.value_dim, ledger.T, ledger.c
        mask = dropout_mask(c, ledger.device)
        ledger.per_token += (2 * H * s + H * v) * c + H * v * c
        probs = c if ledger.device == "cpu" else FP32 + c
        ledger.per_sequence += H * T * ((T + bool(spec.sinks)) * probs + (T * c if spec.logit_softcap else 0)
                                        + (T * (mask + c) if spec.dropout else 0))
        ledger.per_batch += T * T


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """``flex_attention`` compiled once per process (its eager form materialises the scores)."""
    return torch.compile(flex_attention, dynamic=False)


class Flex(Kernel):
    """FlexAttention: a block mask (causal, window, chunk) skips the blocks no query sees, a score_mod soft-caps,
    and sinks rescale the output by the log-sum-exp: with l = log sum_j exp(s_j), softmax over the keys and the
    sink s0 gives sum_j exp(s_j) v_j / (exp(l) + exp(s0)) = out * 1 / (1 + exp(s0 - l)) = out * sigmoid(l - s0).
    Nothing [T, S] is kept.  Whole sequences only (a call through a cache and attention dropout take
    ``fallback``); ``compiled`` False runs torch's eager flex_attention (which has no CPU backward)."""

    def __init__(self, window=None, chunk=None, softcap=None, compiled: bool = True):
        super().__init__(window, chunk, softcap)
        self.compiled = compiled
        self.fallback = Explicit(window, chunk, softcap)
        self._masks: dict = {}

    def block_mask(self, T: int, device):
        key = (T, str(device))
        if key not in self._masks:
            window, chunk = self.window, self.chunk

            def seen(b, h, q_idx, kv_idx):
                ok = kv_idx <= q_idx
                if window is not None:
                    ok = ok & (kv_idx > q_idx - window)
                if chunk is not None:
                    ok = ok & (kv_idx // chunk == q_idx // chunk)
                return ok
            self._masks[key] = create_block_mask(seen, None, None, T, T, device=device)
        return self._masks[key]

    def forward(self, q_BHTE, k_BKSE, v_BKSE, pos=None, scale=None, dropout_p=0.0, sinks=None):
        if pos is not None or dropout_p:
            return self.fallback(q_BHTE, k_BKSE, v_BKSE, pos, scale, dropout_p, sinks)
        cap = self.softcap
        score_mod = None if cap is None else (lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap))
        dtype = torch.get_autocast_dtype(q_BHTE.device.type) if torch.is_autocast_enabled(q_BHTE.device.type) \
            else v_BKSE.dtype                         # flex wants one dtype (autocast does not cover it)
        q, k, v = (t.to(dtype) for t in (q_BHTE, k_BKSE, v_BKSE))
        attend = _compiled_flex() if self.compiled else flex_attention
        lse = AuxRequest(lse=True) if sinks is not None else None       # compiled CPU flex cannot return it
        out = attend(q, k, v, score_mod=score_mod, block_mask=self.block_mask(q.shape[2], q.device), scale=scale,
                     enable_gqa=k.shape[1] != q.shape[1], return_aux=lse)
        if sinks is None:
            return out
        y_BHTE, aux = out
        return y_BHTE * torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(y_BHTE.dtype)
        return y_BHTE

    @staticmethod
    def plan(ledger, spec):
        """q, k and v (fresh copies in the compute dtype where autocast casts them), the output, its log-sum-exp
        and its copy for the out-projection; with sinks the fp32 rescale factor and the rescaled output."""
        H, v, c = spec.n_heads, spec.value_dim, ledger.c
        if ledger.dtype == c:
            ledger.keep("q", "k", "v")
        else:
            ledger.per_token += sum(ledger.widths.values()) * c
        ledger.per_token += H * v * c * 2 + H * FP32
        if spec.sinks:
            ledger.per_token += H * FP32 + H * v * c


class ByDevice(Kernel):
    """One kernel for CUDA and another elsewhere, picked at each call by q's device (a model is built before it is
    moved to its device)."""

    def __init__(self, on_cuda: Kernel, other: Kernel):
        super().__init__()
        self.on_cuda, self.other = on_cuda, other

    def forward(self, q_BHTE, *args, **kwargs):
        return (self.on_cuda if q_BHTE.is_cuda else self.other)(q_BHTE, *args, **kwargs)


class CPUFloat32(Kernel):
    """The CPU precision policy around another kernel: under CPU autocast, attention runs in fp32.

    On the CPU, torch's bf16 attention kernels are slower than its fp32 ones while bf16 matmuls are faster where
    the CPU has AMX or AVX512-BF16: at 12 x 4 heads x 64 positions x 32 wide, forward + backward took 6.7 ms in
    bf16 (flash) and 2.1 ms (math) against 1.3 ms in fp32 (flash), torch 2.13 on 2 cores (AMX); 3.7 ms bf16
    (flash) against 1.0 ms fp32 on an AVX512-BF16 machine.  So a CPU bf16 run keeps its projections in bf16 and
    attends in fp32: ``prepare`` casts the projections once (so q/k-norm and RoPE run in fp32 too: the fused
    rms_norm needs input and weight of one dtype), and an ``fp32`` kernel (SDPA) runs with autocast off on fp32
    q, k, v, its result in q's dtype.  Other kernels keep autocast (the explicit kernel's matmuls in bf16)."""

    def __init__(self, inner: Kernel, fp32: bool = True):
        super().__init__()
        self.inner, self.fp32 = inner, fp32

    @staticmethod
    def active(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and torch.is_autocast_enabled("cpu")

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() if self.active(t) else t

    def forward(self, q_BHTE, k_BKSE, v_BKSE, *args, **kwargs):
        if not (self.fp32 and self.active(q_BHTE)):
            return self.inner(q_BHTE, k_BKSE, v_BKSE, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return self.inner(q_BHTE.float(), k_BKSE.float(), v_BKSE.float(), *args, **kwargs).to(q_BHTE.dtype)
