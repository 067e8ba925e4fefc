"""How one of our tensors is made of Hugging Face tensors, and back: a :class:`Rule` per tensor.

A family (``families.py``) lists one rule per tensor of our state dict: its
name, the Hugging Face tensor names it is made of, and the two functions
between them.  Import calls ``to_ours`` on the tensors read from the
safetensors files; export calls ``to_hf`` on our tensor; the shapes Hugging
Face must have are ``to_hf`` applied to a ``meta`` tensor of our shape (so the
shape check can never disagree with the conversion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..train.checkpoint import CheckpointError


class HFError(CheckpointError):
    """A Hugging Face model directory (or an export target) that we cannot convert exactly; one line."""


@dataclass(frozen=True)
class Rule:
    ours: str                                                   # our state-dict name
    hf: tuple[str, ...]                                         # the Hugging Face names it is made of
    to_ours: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]

    def hf_shapes(self, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """The shape each Hugging Face tensor must have for our tensor of ``shape``."""
        parts = self.to_hf(torch.empty(tuple(shape), device="meta"))
        return {name: tuple(t.shape) for name, t in zip(self.hf, parts)}


def same(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf,), lambda ts: ts[0], lambda t: [t])


def shifted(ours: str, hf: str, offset: float = 1.0, factor: float = 1.0) -> Rule:
    """Ours is ``(hf + offset) * factor``, in fp32 at least: Gemma's RMSNorm multiplies by ``1 + weight``
    (``offset`` 1), and a query norm may carry a softmax scale of its own (``factor``)."""
    def to_ours(ts):
        return (ts[0].to(torch.promote_types(ts[0].dtype, torch.float32)) + offset) * factor

    def to_hf(t):
        return [t.to(torch.promote_types(t.dtype, torch.float32)) / factor - offset]
    return Rule(ours, (hf,), to_ours, to_hf)


def transposed(ours: str, hf: str) -> Rule:
    """GPT-2's Conv1D stores ``[in, out]``; nn.Linear ``[out, in]``."""
    return Rule(ours, (hf,), lambda ts: ts[0].t(), lambda t: [t.t()])


def concat(ours: str, hf: Sequence[str], sizes: Sequence[int], dim: int = 0) -> Rule:
    """Ours is the HF tensors concatenated along ``dim`` (fused q|k|v, gate|up)."""
    sizes = list(sizes)
    return Rule(ours, tuple(hf), lambda ts: torch.cat(ts, dim=dim), lambda t: list(t.split(sizes, dim=dim)))


def experts_up(ours: str, gates: Sequence[str], ups: Sequence[str]) -> Rule:
    """Ours ``[E, D, 2I]`` (gate | up on the last axis) from per-expert ``gate_proj``/``up_proj`` ``[I, D]``."""
    n = len(gates)

    def to_ours(ts):
        return torch.stack([torch.cat([g, u], dim=0).t() for g, u in zip(ts[:n], ts[n:])])

    def to_hf(t):
        gate, up = t.transpose(1, 2).chunk(2, dim=1)              # [E, I, D] each
        return [*gate.unbind(0), *up.unbind(0)]
    return Rule(ours, (*gates, *ups), to_ours, to_hf)


def experts_down(ours: str, downs: Sequence[str]) -> Rule:
    """Ours ``[E, I, D]`` from per-expert ``down_proj`` ``[D, I]``."""
    return Rule(ours, tuple(downs), lambda ts: torch.stack([d.t() for d in ts]),
                lambda t: list(t.transpose(1, 2).unbind(0)))


def fused_experts(ours: str, hf: str) -> Rule:
    """Ours ``[E, in, out]`` from transformers 5's fused ``[E, out, in]`` (``gate_up_proj`` [E, 2I, D] with gate
    then up, ``down_proj`` [E, D, I])."""
    return Rule(ours, (hf,), lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2)])


def interleaved(ours: str, hf: str) -> Rule:
    """Ours ``[..., 2I]`` (gate | up on the last axis) from GPT-OSS's interleaved ``[..., 2I]`` (gate at the even
    positions, up at the odd ones): ``gate_up_proj`` [E, D, 2I] and ``gate_up_proj_bias`` [E, 2I]."""
    def to_ours(ts):
        return torch.cat([ts[0][..., 0::2], ts[0][..., 1::2]], dim=-1)

    def to_hf(t):
        gate, up = t.chunk(2, dim=-1)
        return [torch.stack([gate, up], dim=-1).flatten(-2)]
    return Rule(ours, (hf,), to_ours, to_hf)


def permuted(ours: str, hf: str, index: torch.Tensor, dim: int = 0) -> Rule:
    """Ours is the HF tensor with its entries along ``dim`` reordered: ``ours[j] = hf[index[j]]``."""
    inverse = torch.argsort(index)
    return Rule(ours, (hf,), lambda ts: ts[0].index_select(dim, index.to(ts[0].device)),
                lambda t: [t.index_select(dim, inverse.to(t.device))])


def reordered(rule: Rule, index: torch.Tensor, dim: int = 0) -> Rule:
    """``rule`` with the entries of our tensor along ``dim`` reordered: ``ours[j] = rule's[index[j]]``."""
    inverse = torch.argsort(index)
    return Rule(rule.ours, rule.hf, lambda ts: rule.to_ours(ts).index_select(dim, index.to(ts[0].device)),
                lambda t: rule.to_hf(t.index_select(dim, inverse.to(t.device))))


def shared_experts_up(ours: str, gate: str, up: str, n: int) -> Rule:
    """Ours ``[n, D, 2I]`` (gate | up per expert) from one MLP of hidden width ``n * I`` (``gate_proj`` and
    ``up_proj`` ``[n*I, D]``): the width splits into n experts whose outputs add up to the same sum."""
    def to_ours(ts):
        g, u = (x.reshape(n, x.shape[0] // n, x.shape[1]) for x in ts)
        return torch.cat([g, u], dim=1).transpose(1, 2)

    def to_hf(t):
        g, u = t.transpose(1, 2).chunk(2, dim=1)                  # [n, I, D] each
        return [g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])]
    return Rule(ours, (gate, up), to_ours, to_hf)


def shared_experts_down(ours: str, down: str, n: int) -> Rule:
    """Ours ``[n, I, D]`` from the shared MLP's ``down_proj`` ``[D, n*I]``."""
    return Rule(ours, (down,), lambda ts: ts[0].t().reshape(n, ts[0].shape[1] // n, ts[0].shape[0]),
                lambda t: [t.reshape(-1, t.shape[-1]).t()])
