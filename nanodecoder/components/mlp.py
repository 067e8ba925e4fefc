"""Dense feed-forward blocks: ``gelu``, ``swiglu``, ``geglu``, ``swiglu_clamped`` and ``relu2``.

The activation functions are shared with the MoE experts (``ACTIVATIONS``),
so a routed expert of kind ``swiglu`` computes exactly what the dense
``swiglu`` MLP computes (experts of these kinds are 3-D tensors, see
:func:`batched_activation`; any other MLP kind is an expert as one module each).
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config.declare import Kind, context, declared, param, round_up
from .base import Component, mark_residual, no_aux
from .contracts import FP32, MLPKind, dropout_mask, saved_storages

HIDDEN_MULT_DOC = "Hidden width as a multiple of d_model, rounded up to multiple_of (hidden_size wins when given)."


def gelu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(h, approximate=approximate)


def relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``h`` holds [gate | up] on its last dimension."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``h`` holds [gate | up]; the gate goes through GELU's tanh approximation (Gemma's ``gelu_pytorch_tanh``)."""
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS: gate clamped above at ``limit``, up to [-limit, limit]; ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    gate, up = h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def expert_params(act: str, dim: int, hidden: int, bias: bool) -> int:
    """Parameters of one feed-forward network of activation ``act`` (up ``dim x width*hidden``, down back)."""
    up = ACTIVATIONS[act][1] * hidden
    return dim * up + hidden * dim + (up + dim if bias else 0)


class _DenseMLP(Component):
    """Up-projection, activation, down-projection.  Subclasses name the activation."""

    ACT: str

    @declared
    class Spec(MLPKind):
        hidden_size: int | None = param(None, doc="Hidden width of the MLP; overrides hidden_mult.", minimum=1)
        hidden_mult: float = param(4.0, doc=HIDDEN_MULT_DOC, exclusive_minimum=0)
        multiple_of: int = param(16, doc="Round a hidden_mult-derived width up to a multiple of this.", minimum=1)
        bias: bool = param(False, doc="Biases on the MLP projections.")
        dropout: float = param(0.0, doc="Dropout on the MLP output.", minimum=0, maximum=1)
        dim: int = context("d_model")

        @property
        def n_params(self) -> int:
            return expert_params(self.impl.ACT, self.dim, self.hidden, self.bias)

        @property
        def hidden(self) -> int:
            """The hidden width: ``hidden_size``, else ``hidden_mult * d_model`` rounded up to ``multiple_of``."""
            if self.hidden_size is not None:
                return self.hidden_size
            return round_up(self.hidden_mult * self.dim, self.multiple_of)

        def saved_bytes_per_token(self, c: int, device: str) -> float:
            """Its input, the activations (:func:`activation_units`), the output dropout's mask."""
            mask = self.dim * dropout_mask(c, device) if self.dropout else 0
            return self.dim * c + activation_units(self.impl.ACT) * self.hidden * c + mask

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        act, width = ACTIVATIONS[self.ACT]
        self.up = nn.Linear(spec.dim, width * spec.hidden, bias=spec.bias)
        self.down = mark_residual(nn.Linear(spec.hidden, spec.dim, bias=spec.bias))
        self.dropout = nn.Dropout(spec.dropout)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.ACT][0](h)

    def forward(self, x: torch.Tensor):
        return self.dropout(self.down(self.activate(self.up(x)))), no_aux()


class GeluMLP(_DenseMLP):
    """Linear -> GELU -> Linear (GPT-2): exact, or ``approximate: tanh`` as in GPT-2."""
    ACT = "gelu"

    @declared
    class Spec(_DenseMLP.Spec):
        approximate: Literal["none", "tanh"] = param(
            "none", doc="GELU form: exact 'none' (nanoGPT) or 'tanh' (original GPT-2).")

    def activate(self, h):
        return gelu(h, self.spec.approximate)


class SwiGLUMLP(_DenseMLP):
    """SiLU-gated MLP (LLaMA): down(silu(gate x) * up x); gate and up share one matmul."""
    ACT = "swiglu"

    @declared
    class Spec(_DenseMLP.Spec):
        hidden_mult: float = param(8.0 / 3.0, doc=HIDDEN_MULT_DOC, exclusive_minimum=0)


class GeGLUMLP(_DenseMLP):
    """GELU-gated MLP (Shazeer 2020; Gemma): down(gelu_tanh(gate x) * up x); gate and up share one matmul."""
    ACT = "geglu"

    @declared
    class Spec(_DenseMLP.Spec):
        hidden_mult: float = param(8.0 / 3.0, doc=HIDDEN_MULT_DOC, exclusive_minimum=0)


class ClampedSwiGLUMLP(_DenseMLP):
    """GPT-OSS's SwiGLU: (clamp(up) + 1) * clamp(gate) * sigmoid(alpha * clamp(gate)); as MoE experts it uses
    the defaults below."""
    ACT = "swiglu_clamped"

    @declared
    class Spec(_DenseMLP.Spec):
        hidden_mult: float = param(8.0 / 3.0, doc=HIDDEN_MULT_DOC, exclusive_minimum=0)
        alpha: float = param(1.702, doc="Slope of the sigmoid gate.", exclusive_minimum=0)
        limit: float = param(7.0, doc="Clamp of the gate (from above) and of up (both sides).", exclusive_minimum=0)

    def activate(self, h):
        return clamped_swiglu(h, self.spec.alpha, self.spec.limit)


class ReLU2MLP(_DenseMLP):
    """Squared-ReLU MLP (Primer, modded-nanoGPT)."""
    ACT = "relu2"


#: the built-in dense MLP kinds, whose experts an MoE stores as 3-D tensors (same activation, same default width)
DENSE = {"gelu": GeluMLP, "swiglu": SwiGLUMLP, "geglu": GeGLUMLP, "swiglu_clamped": ClampedSwiGLUMLP,
         "relu2": ReLU2MLP}

# name -> (function of the up-projected activations, up-projection width factor)
ACTIVATIONS = {"gelu": (gelu, 1), "relu2": (relu2, 1), "swiglu": (swiglu, 2), "geglu": (geglu, 2),
               "swiglu_clamped": (functools.partial(clamped_swiglu, alpha=ClampedSwiGLUMLP.Spec.alpha,
                                                    limit=ClampedSwiGLUMLP.Spec.limit), 2)}


def batched_activation(spec) -> str | None:
    """The :data:`ACTIVATIONS` name under which an MoE runs experts of the mlp kind ``spec`` as 3-D tensors: a
    built-in dense kind's (at its default parameters); None for any other kind, whose experts are one module each."""
    return spec.impl.ACT if spec.impl in DENSE.values() else None


@functools.lru_cache(maxsize=None)
def activation_units(name: str) -> float:
    """Numbers saved per hidden unit from an MLP's up-projection output to its down-projection input (both
    included), for the activation ``name`` of :data:`ACTIVATIONS`: measured once on 2 x 8 units."""
    fn, width = ACTIVATIONS[name]
    tokens, hidden = 2, 8
    seen, out = saved_storages(fn, torch.randn(tokens, width * hidden, requires_grad=True))
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(seen.values()) / FP32 / (tokens * hidden)
