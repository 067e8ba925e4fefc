"""Token dispatch for MoE: sort assignments by expert, apply capacity, combine.

The N tokens' k choices form N*k *assignments*.  They are laid out in a
priority order, stably sorted by expert (so each expert's assignments are
contiguous and still in priority order), cut at the expert's capacity, and
the kept ones gathered into one contiguous buffer.  After the experts ran,
one ``index_add_`` scatters the gate-weighted outputs back to token order.
No Python loop over tokens; no expert sees a token not routed to it.

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
from typing import NamedTuple

import torch

DROP_POLICIES = ("priority", "position")


def expert_capacity(factor: float | None, n_tokens: int, top_k: int, n_experts: int,
                    min_capacity: int = 0) -> int | None:
    """Slots per expert, or ``None`` for dropless (``factor`` is ``None``)."""
    if factor is None:
        return None
    return max(int(min_capacity), math.ceil(factor * n_tokens * top_k / n_experts))


class Dispatch(NamedTuple):
    slot: torch.Tensor     # [M] kept assignments (index into the priority layout), grouped by expert
    token: torch.Tensor    # [M] token of each kept assignment
    counts: torch.Tensor   # [E] kept assignments per expert (int64)
    routed: torch.Tensor   # [E] assignments per expert before dropping (int64)
    n_dropped: torch.Tensor  # scalar int64


def priority_layout(t: torch.Tensor, policy: str) -> torch.Tensor:
    """Flatten an ``[N, k]`` tensor in the drop-priority order of ``policy``."""
    if policy == "priority":
        return t.t().reshape(-1)       # rank-major: all first choices, then all second ...
    if policy == "position":
        return t.reshape(-1)           # token-major
    raise ValueError(f"unknown drop_policy '{policy}' (available: {', '.join(DROP_POLICIES)})")


def plan_dispatch(indices: torch.Tensor, n_experts: int, capacity: int | None,
                  policy: str = "priority") -> Dispatch:
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
    return Dispatch(order, tokens[order], counts, routed, n_dropped)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, plan: Dispatch, n_tokens: int,
            policy: str = "priority") -> torch.Tensor:
    """Scatter gate-weighted expert outputs ``[M, D]`` back to ``[N, D]`` with one ``index_add_``."""
    w = priority_layout(weights, policy)[plan.slot].to(expert_out.dtype)
    out = expert_out.new_zeros(n_tokens, expert_out.shape[-1])
    return out.index_add_(0, plan.token, expert_out * w.unsqueeze(-1))
