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

Shapes: N tokens (B*T flattened), K choices per token (top_k), E experts,
S = N*K assignments (slots) in the priority layout, M kept assignments (rows
of the sorted buffer, M <= S), D d_model.
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
    row: torch.Tensor      # [S] row of each assignment in the sorted buffer; M if it was dropped


def priority_layout(t_NK: torch.Tensor, policy: str) -> torch.Tensor:
    """Flatten an ``[N, K]`` tensor to ``[S]`` in the drop-priority order of ``policy``."""
    if policy == "priority":
        return rearrange(t_NK, "n k -> (k n)")       # rank-major: all first choices, then all second ...
    if policy == "position":
        return rearrange(t_NK, "n k -> (n k)")       # token-major
    raise ValueError(f"unknown drop_policy '{policy}' (available: {', '.join(DROP_POLICIES)})")


def sum_choices(slots_SD: torch.Tensor, n: int, k: int, policy: str) -> torch.Tensor:
    """``[S, D]`` rows in the priority layout of ``policy`` -> ``[N, D]``, summed over each token's k choices."""
    if k == 1:
        return slots_SD
    if policy == "priority":         # k contiguous [N, D] blocks: adding them beats a strided sum
        y_ND = slots_SD[:n] + slots_SD[n:2 * n]
        for r in range(2, k):
            y_ND += slots_SD[r * n:(r + 1) * n]
        return y_ND
    return reduce(slots_SD, "(n k) d -> n d", "sum", k=k)


def plan_dispatch(indices_NK: torch.Tensor, n_experts: int, capacity: int | None,
                  policy: str = "priority") -> DispatchPlan:
    """Group the ``[N, K]`` assignments by expert and drop those over ``capacity``."""
    n, k = indices_NK.shape
    device = indices_NK.device
    expert_S = priority_layout(indices_NK, policy)
    token_S = torch.arange(n, device=device)
    token_S = token_S.repeat(k) if policy == "priority" else token_S.repeat_interleave(k)
    order_M = torch.argsort(expert_S, stable=True)            # every assignment, grouped by expert (M = S so far)
    routed_E = torch.zeros(n_experts, dtype=torch.int64, device=device)
    routed_E.scatter_add_(0, expert_S, torch.ones_like(expert_S))   # bincount, with a static shape
    counts_E = routed_E
    if capacity is not None and capacity < n * k:
        start_E = routed_E.cumsum(0) - routed_E
        rank_in_expert_S = torch.arange(n * k, device=device) - start_E[expert_S[order_M]]
        order_M = order_M[rank_in_expert_S < capacity]
        counts_E = routed_E.clamp(max=capacity)
    n_dropped = routed_E.sum() - counts_E.sum()
    kept = order_M.shape[0]
    row_S = torch.full((n * k,), kept, dtype=torch.int64, device=device)
    row_S[order_M] = torch.arange(kept, device=device)
    return DispatchPlan(order_M, token_S[order_M], counts_E, routed_E, n_dropped, row_S)


def _with_zero_row(t_MD: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``t_MD`` plus one zero row at index M (where ``DispatchPlan.row`` sends dropped slots), unless none is
    dropped (M = ``n_slots``)."""
    if t_MD.shape[0] == n_slots:
        return t_MD
    return torch.cat([t_MD, t_MD.new_zeros(1, t_MD.shape[-1])])


class _Gather(torch.autograd.Function):
    """Tokens -> sorted buffer (``x[token]``); backward: a gather through ``row`` and a sum over choices.

    Autograd would scatter with ``index_add_`` (serial on CPU); every kept
    assignment has exactly one row, so a gather by the inverse map does it.
    """

    @staticmethod
    def forward(ctx, x_ND, token_M, row_S, k, policy):
        ctx.save_for_backward(row_S)
        ctx.n, ctx.k, ctx.policy = x_ND.shape[0], k, policy
        return x_ND.index_select(0, token_M)

    @staticmethod
    def backward(ctx, grad_MD):
        (row_S,) = ctx.saved_tensors
        slots_SD = _with_zero_row(grad_MD, row_S.shape[0]).index_select(0, row_S)
        return sum_choices(slots_SD, ctx.n, ctx.k, ctx.policy), None, None, None, None


class _Combine(torch.autograd.Function):
    """Sorted expert outputs ``[M, D]`` x gate weights -> token order ``[N, D]``, without a scatter.

    forward: weight each row, gather the rows back into the priority layout
    through ``row`` (dropped slots read a zero row), sum each token's choices.
    backward: ``dy`` gathered by ``token`` gives both the expert-output
    gradient (times the weight) and the weight gradient (a row-wise dot).
    """

    @staticmethod
    def forward(ctx, ys_MD, w_S, slot_M, token_M, row_S, k, policy):
        n = row_S.shape[0] // k
        w_M = None if w_S is None else w_S.index_select(0, slot_M).to(ys_MD.dtype)
        # the outputs are kept only for the weights' gradient (none with weight 1)
        ctx.save_for_backward(ys_MD if ctx.needs_input_grad[1] else None, w_M, slot_M, token_M)
        ctx.n_slots, ctx.w_dtype = row_S.shape[0], None if w_S is None else w_S.dtype
        weighted_MD = _with_zero_row(ys_MD if w_M is None else ys_MD * w_M.unsqueeze(-1), row_S.shape[0])
        return sum_choices(weighted_MD.index_select(0, row_S), n, k, policy)

    @staticmethod
    def backward(ctx, dy_ND):
        ys_MD, w_M, slot_M, token_M = ctx.saved_tensors
        dy_MD = dy_ND.index_select(0, token_M)
        d_ys_MD = None
        if ctx.needs_input_grad[0]:
            d_ys_MD = dy_MD if w_M is None else dy_MD * w_M.unsqueeze(-1)
        d_w_S = None
        if ctx.needs_input_grad[1]:
            d_w_M = (dy_MD * ys_MD).sum(-1).to(ctx.w_dtype)
            d_w_S = d_w_M.new_zeros(ctx.n_slots).index_copy_(0, slot_M, d_w_M)
        return d_ys_MD, d_w_S, None, None, None, None, None


def gather_tokens(x_ND: torch.Tensor, plan: DispatchPlan, policy: str = "priority") -> torch.Tensor:
    """``[N, D]`` tokens -> ``[M, D]`` rows grouped by expert (one row per kept assignment)."""
    return _Gather.apply(x_ND, plan.token, plan.row, plan.row.shape[0] // x_ND.shape[0], policy)


def combine(ys_MD: torch.Tensor, weights_NK: torch.Tensor, plan: DispatchPlan,
            policy: str = "priority", weigh: bool = True) -> torch.Tensor:
    """Gate-weighted sum of the ``[M, D]`` expert outputs back in token order ``[N, D]``; ``weigh`` False: each
    output with weight 1 (the weights were applied to the experts' inputs, :func:`weigh_rows`)."""
    k = weights_NK.shape[-1]
    w_S = priority_layout(weights_NK, policy) if weigh else None
    return _Combine.apply(ys_MD, w_S, plan.slot, plan.token, plan.row, k, policy)


def weigh_rows(xs_MD: torch.Tensor, weights_NK: torch.Tensor, plan: DispatchPlan,
               policy: str = "priority") -> torch.Tensor:
    """The ``[M, D]`` rows of the sorted buffer, each times the weight of its assignment (in the rows' dtype)."""
    w_M = priority_layout(weights_NK, policy).index_select(0, plan.slot)
    return xs_MD * w_M.to(xs_MD.dtype).unsqueeze(-1)
