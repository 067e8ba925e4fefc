"""Token dispatch for MoE: sort assignments by expert, apply capacity, combine.

The N tokens' k choices form N*k *assignments*.  They are laid out in a
priority order, stably sorted by expert (so each expert's assignments are
contiguous and still in priority order), cut at the expert's capacity, and
the kept ones gathered into one contiguous buffer.  After the experts ran,
the gate-weighted outputs are gathered back into the priority layout (through
the inverse map ``DispatchPlan.row``) and each token's k choices summed.  Both
directions are gathers, forward and backward (custom autograd functions):
a scatter (``index_add_``) is serial on the CPU.  No Python loop over tokens;
no expert sees a token not routed to it.

Drop order when an expert overflows (``drop_policy``):
``priority``  all tokens' first choices are served before any second choice,
              and so on; within one choice rank, earlier tokens of the
              flattened ``[B*T]`` batch first (batch row-major: sequence 0's
              tokens, then sequence 1's, ...).
``position``  token order only: earlier tokens first, and a token's choices in
              rank order (Megatron's ``position`` policy).
A dropped assignment contributes nothing; a token with every choice dropped
gets a zero MoE output and passes through on the block's residual.

Causality: with a capacity in training mode, whether a token is dropped
depends on the other tokens of the batch, including LATER tokens of its own
sequence (they compete for the same expert slots).  Dropless routing (capacity
``null``, the default) is per-token: no other token changes a token's output,
so eval/inference with ``eval_capacity_factor: null`` (or a generous one) is
causal.

Capacity per expert = ``max(min_capacity, ceil(factor * tokens * k / n_experts))``
with ``tokens`` = B*T of this forward.  Unlike GShard/Switch we do NOT round
it up to an even number.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
from einops import rearrange, reduce

DropPolicy = Literal["priority", "position"]
DROP_POLICIES = get_args(DropPolicy)


def expert_capacity(factor: float | None, n_tokens: int, top_k: int, n_experts: int,
                    min_capacity: int = 0) -> int | None:
    """Slots per expert, or ``None`` for dropless (``factor`` is ``None``)."""
    if factor is None:
        return None
    return max(int(min_capacity), math.ceil(factor * n_tokens * top_k / n_experts))


class DispatchPlan(NamedTuple):
    slot: torch.Tensor     # [M] kept assignments (index into the priority layout), grouped by expert
    token: torch.Tensor    # [M] token of each kept assignment
    counts: torch.Tensor   # [E] kept assignments per expert (int64)
    routed: torch.Tensor   # [E] assignments per expert before dropping (int64)
    n_dropped: torch.Tensor  # scalar int64
    row: torch.Tensor      # [N*k] row of each assignment in the sorted buffer; M if it was dropped


def priority_layout(t: torch.Tensor, policy: str) -> torch.Tensor:
    """Flatten an ``[N, k]`` tensor in the drop-priority order of ``policy``."""
    if policy == "priority":
        return rearrange(t, "n k -> (k n)")       # rank-major: all first choices, then all second ...
    if policy == "position":
        return rearrange(t, "n k -> (n k)")       # token-major
    raise ValueError(f"unknown drop_policy '{policy}' (available: {', '.join(DROP_POLICIES)})")


def sum_choices(slots: torch.Tensor, n: int, k: int, policy: str) -> torch.Tensor:
    """``[N*k, D]`` rows in the priority layout of ``policy`` -> ``[N, D]``, summed over each token's k choices."""
    if k == 1:
        return slots
    if policy == "priority":         # k contiguous [N, D] blocks: adding them beats a strided sum
        out = slots[:n] + slots[n:2 * n]
        for r in range(2, k):
            out += slots[r * n:(r + 1) * n]
        return out
    return reduce(slots, "(n k) d -> n d", "sum", k=k)


def plan_dispatch(indices: torch.Tensor, n_experts: int, capacity: int | None,
                  policy: str = "priority") -> DispatchPlan:
    """Group the ``[N, k]`` assignments by expert and drop those over ``capacity``."""
    n, k = indices.shape
    experts = priority_layout(indices, policy)
    tokens = torch.arange(n, device=indices.device)
    tokens = tokens.repeat(k) if policy == "priority" else tokens.repeat_interleave(k)
    order = torch.argsort(experts, stable=True)
    routed = torch.zeros(n_experts, dtype=torch.int64, device=indices.device)
    routed.scatter_add_(0, experts, torch.ones_like(experts))   # bincount, with a static shape
    counts = routed
    if capacity is not None and capacity < n * k:
        start = routed.cumsum(0) - routed
        rank_in_expert = torch.arange(n * k, device=indices.device) - start[experts[order]]
        order = order[rank_in_expert < capacity]
        counts = routed.clamp(max=capacity)
    n_dropped = routed.sum() - counts.sum()
    kept = order.shape[0]
    row = torch.full((n * k,), kept, dtype=torch.int64, device=indices.device)
    row[order] = torch.arange(kept, device=indices.device)
    return DispatchPlan(order, tokens[order], counts, routed, n_dropped, row)


def _with_zero_row(t: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``t`` plus one zero row at index ``len(t)`` (where ``DispatchPlan.row`` sends dropped slots)."""
    if t.shape[0] == n_slots:
        return t
    return torch.cat([t, t.new_zeros(1, t.shape[-1])])


class _Gather(torch.autograd.Function):
    """Tokens -> sorted buffer (``x[token]``); backward: a gather through ``row`` and a sum over choices.

    Autograd would scatter with ``index_add_`` (serial on CPU); every kept
    assignment has exactly one row, so a gather by the inverse map does it.
    """

    @staticmethod
    def forward(ctx, x, token, row, k, policy):
        ctx.save_for_backward(row)
        ctx.n, ctx.k, ctx.policy = x.shape[0], k, policy
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (row,) = ctx.saved_tensors
        slots = _with_zero_row(grad, row.shape[0]).index_select(0, row)
        return sum_choices(slots, ctx.n, ctx.k, ctx.policy), None, None, None, None


class _Combine(torch.autograd.Function):
    """Sorted expert outputs ``[M, D]`` x gate weights -> token order ``[N, D]``, without a scatter.

    forward: weight each row, gather the rows back into the priority layout
    through ``row`` (dropped slots read a zero row), sum each token's choices.
    backward: ``dy`` gathered by ``token`` gives both the expert-output
    gradient (times the weight) and the weight gradient (a row-wise dot).
    """

    @staticmethod
    def forward(ctx, ys, w_layout, slot, token, row, k, policy):
        n = row.shape[0] // k
        w_sorted = w_layout.index_select(0, slot).to(ys.dtype)
        ctx.save_for_backward(ys, w_sorted, slot, token)
        ctx.n_slots, ctx.w_dtype = row.shape[0], w_layout.dtype
        weighted = _with_zero_row(ys * w_sorted.unsqueeze(-1), row.shape[0])
        return sum_choices(weighted.index_select(0, row), n, k, policy)

    @staticmethod
    def backward(ctx, dy):
        ys, w_sorted, slot, token = ctx.saved_tensors
        dyg = dy.index_select(0, token)
        d_ys = dyg * w_sorted.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:
            d_sorted = (dyg * ys).sum(-1).to(ctx.w_dtype)
            d_w = d_sorted.new_zeros(ctx.n_slots).index_copy_(0, slot, d_sorted)
        return d_ys, d_w, None, None, None, None, None


def gather_tokens(x: torch.Tensor, plan: DispatchPlan, policy: str = "priority") -> torch.Tensor:
    """``[N, D]`` tokens -> ``[M, D]`` rows grouped by expert (one row per kept assignment)."""
    return _Gather.apply(x, plan.token, plan.row, plan.row.shape[0] // x.shape[0], policy)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan,
            policy: str = "priority") -> torch.Tensor:
    """Gate-weighted sum of the ``[M, D]`` expert outputs back in token order ``[N, D]``."""
    k = weights.shape[-1]
    return _Combine.apply(expert_out, priority_layout(weights, policy), plan.slot, plan.token, plan.row,
                          k, policy)
