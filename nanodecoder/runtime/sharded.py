"""What each rank writes to, and reads from, a sharded checkpoint (``torch.distributed.checkpoint``).

A sharded checkpoint holds the model and optimizer tensors under flat keys,
``model.<name>`` and ``optim.<parameter name>.<state key>`` (single-process names and global
shapes), each rank writing and reading only the pieces it holds:

* a replicated tensor (DDP, one process) is a plain tensor: DCP writes it once;
* an FSDP2 parameter, and the optimizer state FSDP2 builds for it, is already a DTensor;
* an expert-parallel slice ``[E / N, ...]`` is viewed as a DTensor on the run's ``(dp, ep)`` mesh,
  replicated over ``dp`` and sharded over ``ep`` on dim 0, so its global shape is the
  single-process ``[E, ...]``; with FSDP2 the slice is itself sharded over ``dp``, and its local
  shard is viewed on the ``(ep, dp)`` mesh as (Shard(0), Shard(0)): split over ep first, then dp.

Loading builds the same views on the *current* layout (any number of processes, any EP degree)
and DCP reads into them in place, which is what makes a checkpoint reshard.  Optimizer state is
created empty (zeros of the saved keys) before the read, then handed to
``optimizer.load_state_dict``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..model import clean_name
from . import expert_parallel as ep_

MODEL, OPTIM = "model.", "optim."


def _expert_view(t: torch.Tensor, groups: ep_.ExpertParallelGroups) -> torch.Tensor:
    """This rank's part of an expert tensor (its slice ``[E / N, ...]``, or FSDP2's DTensor of that slice on ``dp``)
    as a DTensor of the single-process ``[E, ...]``, sharing its storage."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if not isinstance(t, DTensor):
        return DTensor.from_local(t, groups.mesh, [Replicate(), Shard(0)], run_check=False)
    shape = torch.Size((t.shape[0] * groups.size, *t.shape[1:]))
    return DTensor.from_local(t._local_tensor, groups.ep_major, [Shard(0), Shard(0)], run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride())


def _views(model: nn.Module, groups: ep_.ExpertParallelGroups | None) -> tuple[dict[str, torch.Tensor], set[int]]:
    """``model.*`` tensors as DCP should see them, and the ids of the split experts' parameters."""
    split = {id(p) for p in ep_.expert_parallel_params(model)} if groups is not None else set()
    split_names = {clean_name(n) for n, p in model.named_parameters() if id(p) in split}
    out = {}
    for name, t in model.state_dict().items():
        name = clean_name(name)
        if MODEL + name not in out:
            out[MODEL + name] = _expert_view(t, groups) if name in split_names else t
    return out, split


def sharded_state(model: nn.Module, optimizer, names: list[str],
                  groups: ep_.ExpertParallelGroups | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors this rank contributes to a sharded checkpoint, and the optimizer's param_groups (JSON)."""
    tensors, split = _views(model, groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    for i, per_param in sd["state"].items():
        p = params[int(i)]
        for k, v in per_param.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {names[int(i)]}.{k} is not a tensor ({type(v).__name__})")
            wrap = id(p) in split and v.dim() > 0 and v.shape == p.shape
            tensors[f"{OPTIM}{names[int(i)]}.{k}"] = _expert_view(v, groups) if wrap else v
    return tensors, sd["param_groups"]


def load_sharded_state(model: nn.Module, optimizer, names: list[str], groups: ep_.ExpertParallelGroups | None,
                       metadata, read, param_groups: list[dict] | None) -> None:
    """Read a sharded checkpoint into this rank's part of ``model`` (and ``optimizer`` when not None), whatever
    layout wrote it (the caller has checked that its names and shapes are the model's).  ``metadata``: DCP's
    ``state_dict_metadata``; ``read(targets)``: DCP's load into them."""
    targets, split = _views(model, groups)
    state: dict[int, dict[str, torch.Tensor]] = {}
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        for key, m in metadata.items():
            if not key.startswith(OPTIM):
                continue
            name, k = key[len(OPTIM):].rsplit(".", 1)
            p = params[index[name]]
            dtype = m.properties.dtype
            shape = (p.shape[0] * groups.size, *p.shape[1:]) if id(p) in split else tuple(p.shape)   # global
            if tuple(m.size) == tuple(shape):          # a moment: shaped, placed and sharded as its parameter
                t = torch.zeros_like(p, dtype=dtype)
                view = _expert_view(t, groups) if id(p) in split else t
            else:                                       # a scalar such as AdamW's step, the same on every rank
                t = view = torch.zeros(tuple(m.size), dtype=dtype)
            state.setdefault(index[name], {})[k] = t
            targets[key] = view
    read(targets)        # in place: into the parameters' own storage and the new optimizer state
    if optimizer is not None:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# ---- the files (torch.distributed.checkpoint's own format, in one folder) ----------------------------------------
def write(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every rank writes its part of ``tensors`` into ``folder`` (collective in a distributed job)."""
    import torch.distributed.checkpoint as dcp
    dcp.save(tensors, checkpoint_id=str(folder))


def write_in_background(tensors: dict[str, torch.Tensor], folder: Path, group=None):
    """:func:`write`, asynchronously: once this returns the tensors are copied to host memory (they may change),
    and the returned ``wait()`` returns when every rank's part is on disk (DCP's ``async_save``; ``group``: a
    process group of its own, so that its collectives never interleave with training's)."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():     # one process: "torch.distributed is disabled ... single process"
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        future = dcp.async_save(tensors, checkpoint_id=str(folder), process_group=group)
    return future.result


def read(folder: Path, targets: dict[str, torch.Tensor], *, local: bool = False) -> None:
    """Fill ``targets`` in place from ``folder``; ``local``: this process alone, also inside a distributed job."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    alone = local or not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():     # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        dcp.load(targets, checkpoint_id=str(folder), no_dist=alone)


def metadata(folder: Path) -> dict:
    """``{key: metadata}`` (global size, dtype) of the tensors in ``folder``, from its index file."""
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(folder)).read_metadata().state_dict_metadata


def empty_like_saved(meta: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Uninitialised full tensors for the saved tensors under ``prefix`` (what one process reads them into)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    return {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
