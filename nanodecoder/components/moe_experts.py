"""The experts of an MoE layer: ``n`` MLPs, stored as 3-D tensors or as one module each.

:class:`Experts` (the built-in dense kinds, ``mlp.batched_activation``): weights
``up: [n, D, width*H]`` and ``down: [n, H, D]`` (``width`` 2 for swiglu, whose
up-projection holds [gate | up]), optional biases ``up_bias: [n, width*H]`` and
``down_bias: [n, D]``.  The layout is the checkpoint format; the compute path
(per-expert loop or ``torch._grouped_mm``) can change without touching it.
Activations come from ``mlp.ACTIVATIONS``, so an expert of kind ``swiglu``
computes exactly the dense ``swiglu`` MLP.

:class:`ExpertModules` (any other MLP kind, plug-ins included): ``n`` modules
built from that kind's spec (state dict ``experts.<e>.<its names>``), each run
on its own contiguous slice through its own forward.

Both apply them two ways:
``forward_sorted(x_MD, counts_E)``  routed experts: ``x_MD`` holds the tokens
                                    grouped by expert (``counts_E[e]`` rows for
                                    expert e, in expert order); every expert takes
                                    part in the graph, also with 0 rows, so every
                                    expert's parameters get a (zero) gradient
                                    (DDP-safe).
``forward_all(x_ND)``               shared experts: every expert on every token,
                                    outputs summed.

Shapes: N tokens (B*T flattened), M rows of the sorted buffer (kept
assignments), D d_model, E experts (``n``), H expert hidden size, W the
up-projection width (``width * H``), R padded rows.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import module_role
from .init import DEFAULT_INIT, init_model, init_tensor
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
    def use_grouped_mm(self, x_MD: torch.Tensor) -> bool:
        """Whether ``forward_sorted`` takes the ``torch._grouped_mm`` path for ``x_MD``."""
        if self.dispatch == "loop" or not hasattr(torch, "_grouped_mm") or x_MD.shape[0] == 0:
            return False
        dtype = _compute_dtype(x_MD)
        if self.dispatch == "auto" and _cpu_low_precision(x_MD):
            return False  # torch's CPU grouped_mm: a matmul per expert of exactly its rows (CPU_LOW_PRECISION_ROWS)
        ok_dtype = (dtype in (torch.float32, torch.bfloat16) if x_MD.device.type == "cpu"
                    else x_MD.device.type == "cuda" and dtype == torch.bfloat16)
        if not ok_dtype or (_is_compiling() and dtype != torch.bfloat16):
            return False  # grouped_mm rejects fp32 under torch.compile
        return grouped_mm_shapes_ok(self.dim, self.hidden, dtype)

    def forward_sorted(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Apply expert e to rows ``[sum(counts_E[:e]), sum(counts_E[:e+1]))`` of ``x_MD``."""
        if self.use_grouped_mm(x_MD):
            return self._grouped(x_MD, counts_E)
        return self._loop(x_MD, counts_E)

    def _loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if _cpu_low_precision(x_MD):
            return self._padded_loop(x_MD, counts_E)
        sizes = counts_E.tolist()
        h_MW = torch.cat([x_mD @ self.up[e] for e, x_mD in enumerate(x_MD.split(sizes))])   # m: one expert's rows
        if self.up_bias is not None:
            h_MW = h_MW + self.up_bias.to(h_MW.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        y_MD = torch.cat([a_mH @ self.down[e] for e, a_mH in enumerate(self.act(h_MW).split(sizes))])
        if self.down_bias is not None:
            y_MD = y_MD + self.down_bias.to(y_MD.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        return y_MD

    def _padded_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The loop with each expert's rows padded by zero rows to a multiple of ``CPU_LOW_PRECISION_ROWS``; the
        padding's outputs are cut off, so it gets no gradient."""
        outs = []
        for e, x_mD in enumerate(x_MD.split(counts_E.tolist())):
            m = x_mD.shape[0]
            h_RW = F.pad(x_mD, (0, 0, 0, -m % CPU_LOW_PRECISION_ROWS)) @ self.up[e]
            if self.up_bias is not None:
                h_RW = h_RW + self.up_bias[e].to(h_RW.dtype)
            y_RD = self.act(h_RW) @ self.down[e]
            if self.down_bias is not None:
                y_RD = y_RD + self.down_bias[e].to(y_RD.dtype)
            outs.append(y_RD[:m])
        return torch.cat(outs)

    def _grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_MD)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_MW = torch._grouped_mm(x_MD.to(dtype), self.up.to(dtype), offs=offs_E)
        h_MW = _ContiguousGrad.apply(h_MW)
        if self.up_bias is not None:
            h_MW = h_MW + self.up_bias.to(dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        a_MH = self.act(h_MW).contiguous()
        y_MD = _ContiguousGrad.apply(torch._grouped_mm(a_MH, self.down.to(dtype), offs=offs_E))
        if self.down_bias is not None:
            y_MD = y_MD + self.down_bias.to(dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        return y_MD

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


class ExpertModules(nn.ModuleList):
    """``n`` experts of an MLP kind that has no 3-D layout (e.g. a plug-in with its own forward): one module each,
    built from ``spec`` (that kind's spec, sized by the MoE), each run on its own rows as a ``[1, rows, D]`` batch.

    Every parameter inside has the optimizer role ``expert`` (a norm inside keeps ``norm``); the experts' own
    auxiliary outputs (a dense MLP's: none) are not used."""

    role = "expert"

    def __init__(self, n: int, spec):
        super().__init__(spec.build() for _ in range(n))
        for module in self.modules():
            if module_role(module) is None:
                module.role = self.role
        self.initialize(DEFAULT_INIT, routed=True)

    @torch.no_grad()
    def initialize(self, init, routed: bool) -> None:
        """Each module as ``init`` does a model's (its ``init_weights`` where it has one; switch: routed experts
        use ``expert_scale``)."""
        for module in self:
            custom = getattr(module, "init_weights", None)
            if custom is not None:
                custom(init)
            else:
                init_model(module, init, expert=routed)

    @staticmethod
    def _run(module: nn.Module, x_mD: torch.Tensor) -> torch.Tensor:
        y_1mD, _ = module(x_mD[None])
        return y_1mD[0]

    def forward_sorted(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Apply expert e to rows ``[sum(counts_E[:e]), sum(counts_E[:e+1]))`` of ``x_MD``."""
        return torch.cat([self._run(module, x_mD) for module, x_mD in zip(self, x_MD.split(counts_E.tolist()))])

    def forward_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Sum over all experts applied to every row of ``x_ND``."""
        first, *rest = self
        y_ND = self._run(first, x_ND)
        for module in rest:
            y_ND = y_ND + self._run(module, x_ND)
        return y_ND

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
