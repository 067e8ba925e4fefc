"""The experts of an MoE layer: ``n`` MLPs stored as 3-D tensors.

Weights are ``up: [n, D, width*H]`` and ``down: [n, H, D]`` (``width`` 2 for
swiglu, whose up-projection holds [gate | up]), optional biases
``up_bias: [n, width*H]`` and ``down_bias: [n, D]``.  The layout is the
checkpoint format; the compute path (per-expert loop or ``torch._grouped_mm``)
can change without touching it.  Activations come from ``mlp.ACTIVATIONS``,
so an expert of kind ``swiglu`` computes exactly the dense ``swiglu`` MLP.

Two ways to apply them:
``forward_sorted(xs, counts)``  routed experts: ``xs`` holds the tokens grouped
                                by expert (``counts[e]`` rows for expert e, in
                                expert order); every expert takes part in the
                                graph, also with 0 rows, so every expert's
                                parameters get a (zero) gradient (DDP-safe).
``forward_all(x)``              shared experts: every expert on every token,
                                outputs summed (one matmul each way).
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .init import DEFAULT_INIT, init_tensor
from .mlp import ACTIVATIONS

#: How the experts run (the 'dispatch' key of an moe block); not the token plan of moe_dispatch.DispatchPlan
ExpertKernel = Literal["auto", "grouped_mm", "loop"]
DISPATCH_KINDS = get_args(ExpertKernel)

#: Row multiple of a CPU bf16/fp16 expert matmul in the loop.  oneDNN, which runs those matmuls, builds a kernel
#: for every new shape (2-4 ms each, then cached, measured on 2 cores) and routed experts see a new row count
#: nearly every call: unpadded, moe_gpt under bf16 took 760 ms per step against 235 for its dense twin.  Padded to
#: a multiple of 32 rows, an expert width has a few dozen shapes, all cached after the first steps, for ~1.5%
#: more rows at ~1,000 rows per expert.
CPU_LOW_PRECISION_ROWS = 32


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s CPU backward fails on a gradient with zero strides
    (e.g. ``out.sum().backward()`` straight on its output); this guards it.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cpu_low_precision(x: torch.Tensor) -> bool:
    """Expert matmuls on ``x`` run in bf16/fp16 on the CPU (oneDNN: see ``CPU_LOW_PRECISION_ROWS``)."""
    return x.device.type == "cpu" and _compute_dtype(x) != torch.float32


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def grouped_mm_shapes_ok(dim: int, hidden: int, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` needs row strides that are multiples of 16 bytes."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return dim % per == 0 and hidden % per == 0


class Experts(nn.Module):
    """``n`` feed-forward experts of one activation kind, stored as 3-D tensors."""

    role = "expert"          # the optimizer role of these weights (components.base.module_role)

    def __init__(self, n: int, dim: int, hidden: int, kind: str, bias: bool = False,
                 dispatch: str = "auto"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown expert kind '{kind}' (available: {', '.join(sorted(ACTIVATIONS))})")
        if dispatch not in DISPATCH_KINDS:
            raise ValueError(f"unknown dispatch '{dispatch}' (available: {', '.join(DISPATCH_KINDS)})")
        self.n, self.dim, self.hidden, self.kind, self.dispatch = n, dim, hidden, kind, dispatch
        self.act, self.width = ACTIVATIONS[kind]
        self.up = nn.Parameter(torch.empty(n, dim, self.width * hidden))
        self.down = nn.Parameter(torch.empty(n, hidden, dim))
        self.up_bias = nn.Parameter(torch.zeros(n, self.width * hidden)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(n, dim)) if bias else None
        self.initialize(DEFAULT_INIT, routed=True)

    @torch.no_grad()
    def initialize(self, init, routed: bool) -> None:
        """Up-projections fan_in D, down-projections fan_in H and residual; biases zero."""
        init_tensor(self.up, init, self.dim, expert=routed)
        init_tensor(self.down, init, self.hidden, residual=True, expert=routed)
        for b in (self.up_bias, self.down_bias):
            if b is not None:
                b.zero_()

    def extra_repr(self) -> str:
        return (f"n={self.n}, dim={self.dim}, hidden={self.hidden}, kind={self.kind}, "
                f"bias={self.up_bias is not None}, dispatch={self.dispatch}")

    # ------------------------------------------------------------------ routed
    def use_grouped_mm(self, xs: torch.Tensor) -> bool:
        """Whether ``forward_sorted`` takes the ``torch._grouped_mm`` path for ``xs``."""
        if self.dispatch == "loop" or not hasattr(torch, "_grouped_mm") or xs.shape[0] == 0:
            return False
        dtype = _compute_dtype(xs)
        if self.dispatch == "auto" and _cpu_low_precision(xs):
            return False  # torch's CPU grouped_mm: a matmul per expert of exactly its rows (CPU_LOW_PRECISION_ROWS)
        ok_dtype = (dtype in (torch.float32, torch.bfloat16) if xs.device.type == "cpu"
                    else xs.device.type == "cuda" and dtype == torch.bfloat16)
        if not ok_dtype or (_is_compiling() and dtype != torch.bfloat16):
            return False  # grouped_mm rejects fp32 under torch.compile
        return grouped_mm_shapes_ok(self.dim, self.hidden, dtype)

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to rows ``[sum(counts[:e]), sum(counts[:e+1]))`` of ``xs: [M, D]``."""
        if self.use_grouped_mm(xs):
            return self._grouped(xs, counts)
        return self._loop(xs, counts)

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if _cpu_low_precision(xs):
            return self._padded_loop(xs, counts)
        sizes = counts.tolist()
        chunks = xs.split(sizes)
        h = torch.cat([c @ self.up[e] for e, c in enumerate(chunks)])
        if self.up_bias is not None:
            h = h + self.up_bias.to(h.dtype).repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        chunks = self.act(h).split(sizes)
        y = torch.cat([c @ self.down[e] for e, c in enumerate(chunks)])
        if self.down_bias is not None:
            y = y + self.down_bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        return y

    def _padded_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The loop with each expert's rows padded by zero rows to a multiple of ``CPU_LOW_PRECISION_ROWS``; the
        padding's outputs are cut off, so it gets no gradient."""
        outs = []
        for e, c in enumerate(xs.split(counts.tolist())):
            n = c.shape[0]
            h = F.pad(c, (0, 0, 0, -n % CPU_LOW_PRECISION_ROWS)) @ self.up[e]
            if self.up_bias is not None:
                h = h + self.up_bias[e].to(h.dtype)
            y = self.act(h) @ self.down[e]
            if self.down_bias is not None:
                y = y + self.down_bias[e].to(y.dtype)
            outs.append(y[:n])
        return torch.cat(outs)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(xs)
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs.to(dtype), self.up.to(dtype), offs=offs)
        h = _ContiguousGrad.apply(h)
        if self.up_bias is not None:
            h = h + self.up_bias.to(dtype).repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        a = self.act(h).contiguous()
        y = _ContiguousGrad.apply(torch._grouped_mm(a, self.down.to(dtype), offs=offs))
        if self.down_bias is not None:
            y = y + self.down_bias.to(dtype).repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        return y

    # ------------------------------------------------------------------ shared
    def forward_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Sum over all ``E`` experts applied to every row of ``x: [N, D]`` (one matmul each way)."""
        up_DEW = rearrange(self.up, "e d w -> d (e w)")                     # W = width * H
        z_NEW = rearrange(x_ND @ up_DEW, "n (e w) -> n e w", e=self.n)
        if self.up_bias is not None:
            z_NEW = z_NEW + self.up_bias
        a_NEH = rearrange(self.act(z_NEW), "n e h -> n (e h)")
        y_ND = a_NEH @ rearrange(self.down, "e h d -> (e h) d")
        if self.down_bias is not None:
            y_ND = y_ND + self.down_bias.sum(dim=0)
        return y_ND

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
