"""Positional encodings: ``learned`` (added to the input), ``rope`` (rotates q and k) and ``none`` (NoPE).

The decoder asks its positional components for two things per forward pass:
``embed(pos)`` (an additive ``[T, D]`` tensor or None; the model's ``positional`` only) and ``rotary(pos)``
(a :class:`Rotary`: ``cos`` and ``sin`` of shape ``[T, rotary_dim/2]`` and the factor on the softmax scale; or
None), computed once for each distinct positional of the layers (a block or an override may have its own, e.g.
Llama 4's NoPE layers, Gemma 3's global layers at another theta) and handed to the attention of the layers that use
it.  RoPE's frequencies may be scaled for longer contexts (kinds of the ``rope_scaling`` category: ``linear``,
``llama3``, ``yarn``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..config.declare import Kind, choice, context, declared, param
from .base import Component
from .contracts import PositionalKind, RopeScalingKind


class Rotary(NamedTuple):
    """What RoPE hands every attention layer for one forward pass."""
    cos: torch.Tensor              # [T, rotary_dim / 2]
    sin: torch.Tensor
    softmax_factor: float = 1.0    # multiplies the 1/sqrt(d) softmax scale (DeepSeek's YaRN mscale_all_dim)


class LearnedPositional(Component):
    """Learned absolute position embeddings (GPT-2), one per context position."""

    @declared
    class Spec(PositionalKind):
        context_length: int = context()
        dim: int = context("d_model")

        additive = True

        @property
        def n_params(self) -> int:
            return self.context_length * self.dim

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.wpe = nn.Embedding(spec.context_length, spec.dim)

    def embed(self, pos: torch.Tensor) -> torch.Tensor:
        return self.wpe(pos)

    def rotary(self, pos: torch.Tensor):
        return None


class NoPositional(Component):
    """No positional encoding (NoPE: Kazemnejad et al. 2023; Llama 4's every fourth layer): nothing is added to the
    input and q and k are not rotated; causal masking alone tells positions apart."""

    @declared
    class Spec(PositionalKind):
        n_params = 0

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def embed(self, pos: torch.Tensor):
        return None

    def rotary(self, pos: torch.Tensor):
        return None


class RoPE(Component):
    """Rotary position embedding applied to queries and keys (Su et al. 2021), pairing dimension i with
    i + rotary_dim/2 (the "rotate half" layout of GPT-NeoX and Hugging Face LLaMA)."""

    @declared
    class Spec(PositionalKind):
        theta: float = param(10000.0, doc="RoPE base frequency (LLaMA-3 uses 500000).", exclusive_minimum=0)
        partial: float = param(1.0, doc="Fraction of each head's dimensions that is rotated (the first ones, "
                                        "rounded down to an even count; GPT-NeoX, Phi); the rest pass unchanged.",
                               exclusive_minimum=0, maximum=1)
        scaling: Kind | None = choice("rope_scaling", default=None,
                                      doc="Frequency scaling for contexts longer than the one trained on "
                                          "(llama3, yarn); null: none.")
        head_dim: int = context("block.attention.rotary_size")

        n_params = 0
        rotates_heads = True       # the head dimension must be even and the same in every layer

        @property
        def rotary_dim(self) -> int:
            return 2 * int(self.head_dim * self.partial // 2)

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        d = self.spec.rotary_dim
        inv = 1.0 / self.spec.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        if self.spec.scaling is not None:
            inv = self.spec.scaling.scale(inv, self.spec.theta, d)
        return inv.float()

    @property
    def attention_factor(self) -> float:
        """The factor cos and sin are multiplied by (YaRN's attention temperature; 1 otherwise)."""
        return self.spec.scaling.attention_factor if self.spec.scaling is not None else 1.0

    def init_weights(self, init) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)   # also after to_empty() from meta

    def embed(self, pos: torch.Tensor):
        return None

    def rotary(self, pos: torch.Tensor) -> Rotary:
        angles = torch.outer(pos.float(), self.inv_freq)
        a = self.attention_factor
        cos, sin = (angles.cos(), angles.sin()) if a == 1.0 else (angles.cos() * a, angles.sin() * a)
        scaling = self.spec.scaling
        return Rotary(cos, sin, scaling.softmax_factor if scaling is not None else 1.0)


class Llama3Scaling:
    """Llama 3.1's RoPE scaling: low frequencies divided by factor, high ones kept, a smooth ramp between."""

    @declared
    class Spec(RopeScalingKind):
        factor: float = param(doc="How much longer the new context is (Llama 3.1: 8).", exclusive_minimum=0)
        low_freq_factor: float = param(1.0, doc="Wavelengths above original_max_position_embeddings / this are "
                                                "divided by factor.", exclusive_minimum=0)
        high_freq_factor: float = param(4.0, doc="Wavelengths below original_max_position_embeddings / this are "
                                                 "kept.", exclusive_minimum=0)
        original_max_position_embeddings: int = param(8192, doc="The context length the model was trained on.",
                                                      minimum=1)

        EXAMPLES = ({"factor": 8.0, "original_max_position_embeddings": 16}, {"factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 1.0, "original_max_position_embeddings": 16})

        def check(self):
            if self.high_freq_factor < self.low_freq_factor:
                yield ("high_freq_factor",), (f"high_freq_factor ({self.high_freq_factor}) must be at least "
                                              f"low_freq_factor ({self.low_freq_factor})")

        def scale(self, inv_freq: torch.Tensor, theta: float, dim: int) -> torch.Tensor:
            old = self.original_max_position_embeddings
            wavelen = 2 * math.pi / inv_freq
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            out = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            if self.high_freq_factor == self.low_freq_factor:     # Llama 4: no ramp, a step at the one wavelength
                return out
            smooth = ((old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor))
            mixed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
            return torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mixed, out)


class LinearScaling:
    """Linear RoPE scaling (position interpolation, Chen et al. 2023): every frequency divided by factor."""

    @declared
    class Spec(RopeScalingKind):
        factor: float = param(doc="How much longer the new context is (positions are divided by it).",
                              exclusive_minimum=0)

        EXAMPLES = ({"factor": 8.0},)

        def scale(self, inv_freq: torch.Tensor, theta: float, dim: int) -> torch.Tensor:
            return inv_freq / self.factor


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class YarnScaling:
    """YaRN (Peng et al. 2023): frequencies interpolated by factor below a band set by beta_slow/beta_fast, kept
    above it, with a linear ramp between; cos and sin scaled by the attention factor."""

    @declared
    class Spec(RopeScalingKind):
        factor: float = param(doc="How much longer the new context is.", exclusive_minimum=0)
        original_max_position_embeddings: int = param(doc="The context length the model was trained on.", minimum=1)
        beta_fast: float = param(32.0, doc="Rotations over the original context above which a frequency is kept.",
                                 exclusive_minimum=0)
        beta_slow: float = param(1.0, doc="Rotations over the original context below which a frequency is "
                                          "interpolated.", exclusive_minimum=0)
        attention_factor_: float | None = param(
            None, key="attention_factor", doc="Factor on cos and sin (null: yarn_mscale(factor, mscale) / "
                                              "yarn_mscale(factor, mscale_all_dim), or 0.1 ln(factor) + 1 without "
                                              "them).", exclusive_minimum=0)
        mscale: float | None = param(None, doc="DeepSeek's mscale (with mscale_all_dim).", exclusive_minimum=0)
        mscale_all_dim: float | None = param(None, doc="DeepSeek's mscale_all_dim: also multiplies the softmax "
                                                       "scale of every attention layer by yarn_mscale(factor, "
                                                       "mscale_all_dim)^2 (DeepSeek-V2/V3).", exclusive_minimum=0)
        truncate: bool = param(True, doc="Round the band edges to whole dimensions (GPT-OSS: false).")

        EXAMPLES = ({"factor": 4.0, "original_max_position_embeddings": 16},
                    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0})

        @property
        def attention_factor(self) -> float:
            if self.attention_factor_ is not None:
                return self.attention_factor_
            if self.mscale and self.mscale_all_dim:
                return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
            return yarn_mscale(self.factor)

        @property
        def softmax_factor(self) -> float:
            """DeepSeek's temperature on the attention logits (1 without mscale_all_dim)."""
            return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

        def scale(self, inv_freq: torch.Tensor, theta: float, dim: int) -> torch.Tensor:
            old = self.original_max_position_embeddings

            def edge(rotations: float) -> float:     # the dimension whose wavelength fits `rotations` times
                return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

            low, high = edge(self.beta_fast), edge(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
            keep = 1 - ramp                           # 1: extrapolate (keep), 0: interpolate (divide by factor)
            return inv_freq / self.factor * (1 - keep) + inv_freq * keep


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dimensions of ``x: [B, H, T, head_dim]`` by position-dependent
    angles; the other dimensions (partial rotary) pass unchanged."""
    d = 2 * cos.shape[-1]
    rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
    x1, x2 = rot.to(torch.promote_types(rot.dtype, torch.float32)).chunk(2, dim=-1)   # float32 at least
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
    return out if rest is None else torch.cat((out, rest), dim=-1)
