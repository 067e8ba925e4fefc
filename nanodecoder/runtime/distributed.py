"""torch.distributed for the runtime: the process group, small collectives, the DDP / FSDP2
wraps, gradient-sync control and full (unsharded) state dicts for checkpoints.

One backend per job: gloo on the CPU; on CUDA ``cpu:gloo,cuda:nccl`` so that the
small control collectives (stop requests, the run folder's name) go over gloo
on CPU tensors without a GPU sync, and tensors on the GPU over NCCL.  Every
collective times out after ``timeout_s`` (a dead or stuck rank fails the job
instead of hanging it); an exception on any rank ends that process and
torchrun then stops the others.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .profiles import RuntimeSetupError


def init_process_group(device: torch.device, rank: int, world_size: int, timeout_s: int) -> None:
    if not dist.is_available():
        raise RuntimeSetupError("this torch build has no torch.distributed; run a single process")
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise RuntimeSetupError(f"rank {rank} of {world_size} could not join the process group "
                                f"({backend}): {str(e).splitlines()[0]}") from None


def teardown() -> None:
    """Wait for every rank, then leave the process group (a lone destroy can abort gloo)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


_LOST = {"connection closed by peer": "its connection closed", "connection reset by peer": "its connection reset",
         "broken pipe": "its connection broke", "timed out": "it did not answer within runtime.timeout_s",
         "timeout": "it did not answer within runtime.timeout_s"}


def lost_peer(error: BaseException, rank: int, world_size: int) -> str | None:
    """``"rank 1 of 2 was lost (its connection closed)"`` when ``error`` is a collective failing because another
    process of the job died or stopped answering (gloo / NCCL), else None.  Gloo names the peer's address, not its rank:
    the rank is the one torch's message names, the other one of two processes, or else "another rank"."""
    if not isinstance(error, RuntimeError):          # torch.distributed.DistError is a RuntimeError
        return None
    text = str(error)
    low = text.lower()
    why = next((v for k, v in _LOST.items() if k in low), None)
    if why is None:
        return None
    named = [int(n) for n in re.findall(r"\brank[ :=]+(\d+)", text, flags=re.IGNORECASE) if int(n) != rank]
    who = (f"rank {named[0]} of {world_size}" if named else
           f"rank {1 - rank} of 2" if world_size == 2 else f"another rank of {world_size}")
    return f"{who} was lost ({why})"


def new_gloo_group() -> dist.ProcessGroup:
    """A gloo group of every rank, beside the default one (collective: every rank calls it)."""
    return dist.new_group(backend="gloo")


def all_reduce_mean(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Means over ranks of same-device scalars, with one collective (SUM: gloo has no AVG)."""
    packed = torch.stack([v.detach().float().reshape(()) for v in values])
    dist.all_reduce(packed)
    return list((packed / dist.get_world_size()).unbind())


def gather_ints(values: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (the same length on each), in rank order, on every rank (CPU tensor: gloo)."""
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [tuple(int(v) for v in t.tolist()) for t in out]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (CPU tensor: gloo, no GPU sync)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_text(text: str, src: int = 0) -> str:
    """``text`` of rank ``src`` on every rank (UTF-8 bytes in CPU tensors; no pickle)."""
    data = torch.tensor(list(text.encode()) if dist.get_rank() == src else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, src)
    if dist.get_rank() != src:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src)
    return bytes(data.tolist()).decode()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel.  Buffers are not broadcast each forward: the MoE balancing bias
    is kept identical by its own all-reduce, and per-rank load counts must stay per rank.  Parameters
    marked ``expert_parallel`` (each rank's own experts) are neither broadcast nor reduced by DDP."""
    from torch.nn.parallel import DistributedDataParallel
    split = [n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)]
    if split:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, split)
    with warnings.catch_warnings():     # torch 2.13 deprecates the flag but advises it for rank-local buffers
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False, gradient_as_bucket_view=True)


def wrap_fsdp(model: nn.Module, device: torch.device, units: Iterable[nn.Module]) -> nn.Module:
    """FSDP2: ``fully_shard`` each unit (transformer block), then the root (embeddings, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)       # the root keeps its parameters unsharded from forward to backward
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Every FSDP2 unit back to its sharded parameters (a forward without backward, such as an evaluation,
    leaves the root unsharded), so that the module holds the DTensors its optimizer steps; no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step: gradients are reduced across ranks only when ``sync``."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def plain_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2 returns a replicated DTensor)."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


# ---- full state dicts (FSDP gathers, everything else is local) --------------------------------
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module, is_main: bool, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
    """The unsharded model state dict on the main rank (None elsewhere; ``everywhere``: on every rank, on the
    device); collective under FSDP."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=_options(cpu_offload=not everywhere))
        return state if is_main or everywhere else None
    return model.state_dict() if is_main or everywhere else None


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, state, options=_options(strict=True))
    else:
        model.load_state_dict(state, strict=True)


def full_optimizer_state(model: nn.Module, optimizer, names: list[str], is_main: bool,
                         everywhere: bool = False) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` format (integer keys in ``names`` order) with full tensors, on the
    main rank (``everywhere``: on every rank, on the device); so a checkpoint is the same whether the run was
    sharded or not."""
    if not is_fsdp(model):
        return optimizer.state_dict() if is_main or everywhere else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=not everywhere))
    if not (is_main or everywhere):
        return None
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any], names: list[str]) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
