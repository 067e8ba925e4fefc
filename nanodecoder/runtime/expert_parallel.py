"""Expert parallelism: the routed experts of every MoE layer split across the N ranks of an
expert-parallel group, tokens sent to their experts' ranks and back with ``all_to_all_single``.

Layout (:func:`expert_parallel_groups`): the W ranks form a 2-D DeviceMesh ``(dp, ep)`` =
``(W / N, N)``; rank ``r`` is ``ep`` rank ``r % N`` of the expert-parallel group of ranks
``[N * (r // N), N * (r // N + 1))`` and owns the contiguous experts
``[ep_rank * E / N, (ep_rank + 1) * E / N)`` of every MoE layer.  The ranks holding the same
experts (one per expert-parallel group) form its ``expert_dp`` group.

What stays as in one process: the router, the dispatch plan (capacity is per rank, applied
before the experts as today), the combine, the shared experts and every non-expert parameter
are replicated; only ``MoE.experts`` is swapped (:func:`apply_expert_parallel`) for an
:class:`ExpertParallelExperts` holding its local slices under the single-process names
(``up``, ``down``, biases; first dimension E / N instead of E).

Gradients (each rank's loss the mean over its own tokens): non-expert gradients are averaged
over all W ranks (DDP); an expert parameter receives through the all_to_all backward the sum of
its EP group's ranks' gradients, and :func:`sync_expert_grads` sums it over ``expert_dp`` and
divides by W, which gives the gradient of the mean of all ranks' losses -- the single process's
on the concatenated batch.  :func:`grad_norm` / :func:`clip_grad_norm` give the global norm.

With FSDP2 (``runtime.data_parallel: fsdp``, :func:`shard_experts`): each layer's local experts are
``fully_shard``-ed on the ``dp`` dimension of the mesh (the ranks holding the same experts), every other
parameter on all W ranks, as torchtitan lays them out; FSDP2's reduce-scatter (a mean over ``dp``) then does
what :func:`sync_expert_grads` does under DDP, but for a factor 1 / N (:func:`finish_sharded_expert_grads`; a
divide factor of W in FSDP2 itself would need ReduceOp.PREMUL_SUM, which gloo lacks), and the gradient norm is the
all-reduce over all ranks of each rank's local squares (every piece of every parameter lives on exactly
one rank).

Checkpoints: :func:`gather_full_experts_state` returns the single-process state dict on rank 0;
:func:`load_local_experts` loads one into an expert-parallel model (each rank takes its slices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..components.moe import MoE
from ..components.moe_experts import Experts
from ..config.declare import divisors

KEY = "runtime.expert_parallel"


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups of an expert-parallel run (see the module docstring for the layout)."""
    ep: dist.ProcessGroup            # the N ranks that split the experts between them
    expert_dp: dist.ProcessGroup     # the W / N ranks holding the same experts
    world_size: int
    mesh: DeviceMesh | None = None   # the 2-D ``(dp, ep)`` DeviceMesh the two groups come from
    # the same ranks as ``(ep, dp)``: an expert tensor [E, ...] split first over ep, then (FSDP2) over dp, is a
    # DTensor (Shard(0), Shard(0)) on it, so a sharded checkpoint stores single-process names and shapes
    ep_major: DeviceMesh | None = None

    @property
    def size(self) -> int:
        return self.ep.size()


def check_degree(n: int, world: int) -> None:
    """ValueError (naming the key) unless ``n`` expert-parallel ranks divide the ``world`` processes."""
    if n < 1 or world % n:
        raise ValueError(f"{KEY}: {n} must divide the number of processes ({world}); "
                         f"choose one of {divisors(world)}")


def expert_parallel_groups(n: int, device_type: str = "cpu") -> ExpertParallelGroups:
    """The ``(dp, ep)`` DeviceMesh of the default process group, as :class:`ExpertParallelGroups`
    (collective: every rank calls it)."""
    world = dist.get_world_size()
    check_degree(n, world)
    mesh = init_device_mesh(device_type, (world // n, n), mesh_dim_names=("dp", "ep"))
    ep_major = DeviceMesh(device_type, mesh.mesh.t().contiguous(), mesh_dim_names=("ep", "dp"))
    return ExpertParallelGroups(mesh.get_group("ep"), mesh.get_group("dp"), world, mesh, ep_major)


class _Permute(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm``; backward ``grad[inverse]`` (a gather, no scatter)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    return t.cumsum(0) - t


def source_to_expert_order(counts_SL: torch.Tensor) -> torch.Tensor:
    """The permutation taking rows laid out source-major (source s's block, inside it expert l's
    ``counts_SL[s, l]`` rows) to expert-major (expert l's rows, inside them by source)."""
    starts_SL = _exclusive_cumsum(counts_SL.reshape(-1)).view_as(counts_SL)
    sizes_LS = counts_SL.t().reshape(-1)
    starts_LS = starts_SL.t().reshape(-1)
    total = int(sizes_LS.sum())
    block_shift = (starts_LS - _exclusive_cumsum(sizes_LS)).repeat_interleave(sizes_LS, output_size=total)
    return block_shift + torch.arange(total, device=counts_SL.device)


def _all_to_all(x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows ``send[r]`` of ``x`` to each rank r, ``recv[s]`` rows from each rank s; differentiable (the
    backward sends the gradients back the same way): torch's functional collective."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), recv, send, group))


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))


class ExpertParallelExperts(Experts):
    """The local ``E / N`` experts of one MoE layer, with ``forward_sorted`` over all ``E``.

    Built from the full :class:`Experts` (``from_full``): its parameters are this rank's slices
    of the full ones (same names, first dimension ``E / N``), each marked ``expert_parallel``.
    The compute on the local experts is :class:`Experts`' own (grouped_mm or loop).
    """

    def __init__(self, n_experts: int, local_experts: slice, group: dist.ProcessGroup, dim: int, hidden: int,
                 kind: str, bias: bool, dispatch: str):
        with torch.device("meta"):       # no memory and no draw from the RNG: from_full sets the weights
            super().__init__(local_experts.stop - local_experts.start, dim, hidden, kind, bias, dispatch)
        self.n_experts, self.local_experts, self.group = n_experts, local_experts, group

    @classmethod
    def from_full(cls, experts: Experts, group: dist.ProcessGroup) -> "ExpertParallelExperts":
        n, size = experts.n, group.size()
        if n % size:
            raise ValueError(f"{KEY}: {size} must divide n_experts ({n}) of every MoE layer; "
                             f"choose one of {divisors(n)}")
        per = n // size
        local = slice(group.rank() * per, (group.rank() + 1) * per)
        out = cls(n, local, group, experts.dim, experts.hidden, experts.kind, experts.up_bias is not None,
                  experts.dispatch)
        for name, p in experts.named_parameters(recurse=False):
            sliced = nn.Parameter(p.detach()[local].clone(), requires_grad=p.requires_grad)
            sliced.expert_parallel = True
            setattr(out, name, sliced)
        return out

    def extra_repr(self) -> str:
        return (f"experts [{self.local_experts.start}, {self.local_experts.stop}) of {self.n_experts}, "
                f"{super().extra_repr()}")

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``[sum(counts[:e]), sum(counts[:e+1]))`` of ``xs: [M, D]``, for all E
        experts (``counts: [E]``), each run on its owner rank; the same result as ``Experts``'."""
        ranks, per = self.group.size(), self.n
        sent_RL = counts.to(torch.int64).reshape(ranks, per)          # rows for each rank's local experts
        received_SL = torch.empty_like(sent_RL)
        dist.all_to_all_single(received_SL, sent_RL, group=self.group)  # [source, local expert] row counts
        send = sent_RL.sum(1).tolist()
        recv = received_SL.sum(1).tolist()
        xr = _all_to_all(xs, recv, send, self.group)
        perm = source_to_expert_order(received_SL)
        inverse = _inverse(perm)
        ys = super().forward_sorted(_Permute.apply(xr, perm, inverse), received_SL.sum(0))
        back = _Permute.apply(ys, inverse, perm)
        return _all_to_all(back, send, recv, self.group)


def expert_parallel_modules(model: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            yield name, m


def expert_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters split by expert parallelism (those of the :class:`ExpertParallelExperts`, each also
    marked ``expert_parallel = True``), in ``model.parameters()`` order."""
    split = {id(p) for _, m in expert_parallel_modules(model) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) in split]


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter (the same on every rank: averaged over all ranks, as by DDP)."""
    split = {id(p) for p in expert_parallel_params(model)}
    return [p for p in model.parameters() if id(p) not in split]


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup,
                          dp_group_of_experts: dist.ProcessGroup) -> ExpertParallelGroups:
    """Swap every MoE layer's routed experts for this rank's :class:`ExpertParallelExperts` (its slices
    of the model's weights: build the model identically on every rank, e.g. with one seed, and
    initialise it before this call).  Returns the groups for :func:`sync_expert_grads` and the norms."""
    world = dist.get_world_size()
    if world % ep_group.size() or ep_group.size() * dp_group_of_experts.size() != world:
        raise ValueError(f"{KEY}: {ep_group.size()} expert-parallel ranks x {dp_group_of_experts.size()} "
                         f"replicas must make the number of processes ({world})")
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE) or isinstance(moe.experts, ExpertParallelExperts):
            continue
        if type(moe.experts) is not Experts:
            raise ValueError(f"{KEY}: the experts of {name} ({type(moe.experts).__name__}) have no 3-D layout; "
                             "expert parallelism needs a built-in expert_kind")
        moe.experts = ExpertParallelExperts.from_full(moe.experts, ep_group)
    return ExpertParallelGroups(ep_group, dp_group_of_experts, world)


def shard_experts(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """FSDP2 on the split experts (call before ``fully_shard`` of the blocks, which then leave them out): each
    :class:`ExpertParallelExperts` sharded over the ``dp`` ranks holding the same experts, its ``forward_sorted``
    (what the MoE layer calls) gathering them, and its gradients reduce-scattered as their mean over ``dp``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    dp = groups.mesh["dp"]
    for _, m in expert_parallel_modules(model):
        fully_shard(m, mesh=dp)
        register_fsdp_forward_method(m, "forward_sorted")


@torch.no_grad()
def finish_sharded_expert_grads(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Under FSDP2, after the reduce-scatter: each expert gradient shard (the mean over ``dp`` of sums over the
    expert-parallel group) divided by N, which gives the global-mean gradient."""
    grads = [_local(p.grad) for p in expert_parallel_params(model) if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / groups.size)


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:               # keeps every rank's collectives the same
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, world_size: int, expert_dp_group: dist.ProcessGroup) -> None:
    """Expert gradients (each the sum over its EP group's ranks after the backward) summed over the
    ranks holding the same experts and divided by ``world_size``: the global-mean gradient."""
    grads = _grads(expert_parallel_params(model))
    if expert_dp_group.size() > 1:      # in buckets of ~BUCKET_BYTES: never a flat copy of all expert gradients
        for bucket in _buckets(grads):
            alone = len(bucket) == 1 and bucket[0].is_contiguous()
            flat = bucket[0] if alone else torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=expert_dp_group)
            if flat is not bucket[0]:
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
    if grads:
        torch._foreach_mul_(grads, 1.0 / world_size)


BUCKET_BYTES = 25 * 2 ** 20     # as DDP's default bucket


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``grads`` in order, grouped into runs of at most ~BUCKET_BYTES (a larger tensor alone, reduced in place)."""
    bucket, size = [], 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def grad_norm(model: nn.Module, groups: ExpertParallelGroups, norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm once gradients are synchronised (replicated ones counted once,
    expert ones summed over the expert-parallel group); the same on every rank (collective)."""
    if norm_type != 2.0:
        raise ValueError(f"grad_norm: only the 2-norm is supported under {KEY} (got {norm_type})")
    device = next(model.parameters()).device
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if any(_is_dtensor(g) for g in grads):   # FSDP2: each piece of each gradient on one rank, experts included
        norms = torch._foreach_norm([_local(g) for g in grads])      # as get_total_norm, shard by shard
        squares = torch.stack(norms).double().square().sum()
        dist.all_reduce(squares)
        return squares.sqrt().float()
    expert = [p.grad for p in expert_parallel_params(model) if p.grad is not None]
    rest = [p.grad for p in replicated_params(model) if p.grad is not None]
    zero = torch.zeros((), device=device)
    e2 = torch.nn.utils.get_total_norm(expert).to(device).square() if expert else zero.clone()
    dist.all_reduce(e2, group=groups.ep)
    r2 = torch.nn.utils.get_total_norm(rest).to(device).square() if rest else zero
    return (e2 + r2).sqrt()


@torch.no_grad()
def clip_grad_norm(model: nn.Module, groups: ExpertParallelGroups, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the global norm of :func:`grad_norm`; returns that norm."""
    total = grad_norm(model, groups)
    params = [p for p in model.parameters() if p.grad is not None]
    if any(_is_dtensor(p.grad) for p in params):   # DTensors of two meshes: scaled shard by shard, as torch does
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([_local(p.grad) for p in params], coef)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard, in place; a plain tensor itself)."""
    return t._local_tensor if _is_dtensor(t) else t


# ---- full state (checkpoints, HF export) ------------------------------------------------------
def _expert_keys(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {f"{prefix}.{name}" if prefix else name: m
            for prefix, m in expert_parallel_modules(model) for name, _ in m.named_parameters(recurse=False)}


@torch.no_grad()
def gather_full_experts_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                              ) -> dict[str, torch.Tensor] | None:
    """The single-process state dict (names and shapes) on global rank 0, None elsewhere: each expert
    tensor gathered from its expert-parallel group (collective: every rank calls it).  ``state``: this rank's
    state dict with its expert slices whole (FSDP2's gathered over ``dp``), by default ``model.state_dict()``."""
    owners = _expert_keys(model)
    main = dist.get_rank() == 0
    state = model.state_dict() if state is None else state
    for key, m in owners.items():
        if 0 not in dist.get_process_group_ranks(m.group):
            continue                     # only the expert-parallel group of rank 0 takes part
        local = state[key].contiguous()
        parts = [torch.empty_like(local) for _ in range(m.group.size())] if main else None
        dist.gather(local, parts, group=m.group, group_dst=dist.get_group_rank(m.group, 0))
        if main:
            state[key] = torch.cat(parts)
    return state if main else None


@torch.no_grad()
def load_local_experts(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Load a single-process (full) state dict into an expert-parallel model: every tensor as it is,
    each expert tensor as this rank's slice (strict: names and shapes must match)."""
    model.load_state_dict(local_experts_state(model, full_state), strict=True)


def local_experts_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full_state`` with each expert tensor cut to this rank's slice (what :func:`load_local_experts` loads)."""
    local = dict(full_state)
    for key, m in _expert_keys(model).items():
        full = full_state.get(key)
        if full is None:
            continue                     # strict loading below names the missing key
        if full.shape[0] != m.n_experts:
            raise ValueError(f"{key}: the state holds {full.shape[0]} experts, the model {m.n_experts}; "
                             "load a checkpoint of this model")
        local[key] = full[m.local_experts]
    return local


def full_state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of the single-process state dict of an expert-parallel model (no communication)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, m in _expert_keys(model).items():
        shapes[key] = (m.n_experts, *shapes[key][1:])
    return shapes


def _indexed_expert_params(model: nn.Module, optimizer) -> dict[int, tuple[nn.Parameter, ExpertParallelExperts]]:
    owner = {id(p): m for _, m in expert_parallel_modules(model) for p in m.parameters(recurse=False)}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: (p, owner[id(p)]) for i, p in enumerate(flat) if id(p) in owner}


@torch.no_grad()
def gather_full_optimizer_state(model: nn.Module, optimizer, state: dict | None = None) -> dict | None:
    """``optimizer.state_dict()`` with every expert parameter's per-parameter tensors (those shaped like the
    local slice: AdamW's moments, momentum buffers) gathered along the expert dimension, as one process would
    hold them, on global rank 0; None elsewhere (collective: every rank calls it).  ``state``: this rank's
    optimizer state dict in that format with its expert slices whole, by default ``optimizer.state_dict()``."""
    main = dist.get_rank() == 0
    state = optimizer.state_dict() if state is None else state
    state = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
    for i, (p, m) in sorted(_indexed_expert_params(model, optimizer).items()):
        if 0 not in dist.get_process_group_ranks(m.group) or i not in state["state"]:
            continue
        entry = dict(state["state"][i])          # a copy: the optimizer's own state stays local
        for name in sorted(entry):
            local = entry[name]
            if not (isinstance(local, torch.Tensor) and local.shape == p.shape):
                continue                          # e.g. AdamW's step: the same on every rank
            local = local.contiguous()
            parts = [torch.empty_like(local) for _ in range(m.group.size())] if main else None
            dist.gather(local, parts, group=m.group, group_dst=dist.get_group_rank(m.group, 0))
            if main:
                entry[name] = torch.cat(parts)
        state["state"][i] = entry
    return state if main else None


def load_local_optimizer_state(model: nn.Module, optimizer, full_state: dict) -> None:
    """Load a single-process (full) optimizer state into the optimizer of an expert-parallel model: each
    expert parameter's full-size tensors as this rank's slice."""
    optimizer.load_state_dict(local_optimizer_state(model, optimizer, full_state))


def local_optimizer_state(model: nn.Module, optimizer, full_state: dict) -> dict:
    """``full_state`` (``optimizer.state_dict()`` format) with each expert parameter's full-size tensors cut to
    this rank's slice (what :func:`load_local_optimizer_state` loads)."""
    state = {"state": dict(full_state["state"]), "param_groups": full_state["param_groups"]}
    for i, (p, m) in _indexed_expert_params(model, optimizer).items():
        key = i if i in state["state"] else str(i)
        if key not in state["state"]:
            continue
        entry = dict(state["state"][key])
        for name, full in entry.items():
            if isinstance(full, torch.Tensor) and full.dim() == p.dim() and full.shape[1:] == p.shape[1:]:
                if full.shape[0] != m.n_experts:
                    raise ValueError(f"optimizer state {name} of an expert parameter holds {full.shape[0]} "
                                     f"experts, the model {m.n_experts}")
                entry[name] = full[m.local_experts]
        state["state"][key] = entry
    return state


__all__ = ["ExpertParallelExperts", "ExpertParallelGroups", "apply_expert_parallel", "check_degree",
           "clip_grad_norm", "expert_parallel_groups", "expert_parallel_modules", "expert_parallel_params",
           "finish_sharded_expert_grads", "full_state_shapes", "gather_full_experts_state",
           "gather_full_optimizer_state", "grad_norm", "load_local_experts", "load_local_optimizer_state",
           "local_experts_state", "local_optimizer_state", "replicated_params", "shard_experts",
           "source_to_expert_order", "sync_expert_grads"]
