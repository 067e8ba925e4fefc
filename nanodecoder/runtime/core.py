"""The :class:`Runtime`: everything device-, precision- and process-dependent the trainer needs.

The trainer, the loop and checkpointing ask the runtime and never branch on
the device type themselves.  :meth:`Runtime.apply` prepares a model in one
fixed order: device -> precision -> activation checkpointing -> compile ->
data-parallel wrap (DDP or FSDP2).
"""
from __future__ import annotations

import contextlib
import gc
import random
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from ..model import unwrap
from ..model.params import ParamReport, count_params
from . import distributed as dist_
from . import expert_parallel as ep_
from . import sharded as sharded_
from .compile import compile_errors, compile_model, eager, transformer_blocks
from .hardware import Launch, MemoryBudget, available_memory
from .profiles import Profile, RuntimeSetupError

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch CPU and CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Recomputed:
    """A transformer block recomputed in the backward (activation checkpointing): its training forward keeps only
    the block's input, and ``torch.utils.checkpoint`` (non-reentrant) runs the forward again when the gradients
    are needed, with the RNG state of the first run, so dropout and router noise repeat exactly.  Evaluation,
    sampling (a KV cache) and forwards without gradients run the block as it is.

    :func:`checkpoint_blocks` gives a block this behaviour by subclassing its class in place (as FSDP2's
    ``fully_shard`` does), so the module tree, parameter names, state dicts, optimizer rules and checkpoints are
    those of the plain model; torch's ``checkpoint_wrapper`` keeps the state-dict keys but renames every
    parameter (``blocks.0._checkpoint_wrapped_module.*``), which the optimizer's saved parameter names and the
    name patterns of ``train.optimizer.rules`` would see."""

    def forward(self, x: torch.Tensor, rotaries=None, cache=None):
        if self.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, rotaries, use_reentrant=False)
        return super().forward(x, rotaries, cache)


_RECOMPUTED: dict[type, type] = {}


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """Make each transformer block of ``model`` a :class:`Recomputed` one (in place, once); returns the blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        cls = type(block)
        if not isinstance(block, Recomputed):
            if cls not in _RECOMPUTED:
                _RECOMPUTED[cls] = type(f"Recomputed{cls.__name__}", (Recomputed, cls), {"__module__": __name__})
            block.__class__ = _RECOMPUTED[cls]
    return blocks


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"                 # resolved: fp32 | bf16 | fp16
    rank: int = 0
    world_size: int = 1
    threads: int = 1
    local_rank: int = 0
    data_parallel: str | None = None        # "ddp" | "fsdp" when world_size > 1
    compile: bool = False
    compile_mode: str = "default"
    peak_flops: float | None = None         # of one device; None: unknown (no MFU)
    peak_source: str = ""
    profile: Profile | None = None
    host_memory_cached: bool = False        # glibc keeps freed memory (profile's cache_host_memory)
    activation_checkpointing: bool = False  # recompute each block in the backward (profile's setting)
    local_world_size: int = 1               # processes on this node (they share its host memory)
    expert_parallel: ep_.ExpertParallelGroups | None = None   # runtime.expert_parallel > 1: its process groups
    scaler: Any = field(default=None, repr=False)
    full_params: ParamReport | None = field(default=None, repr=False)   # counted before the experts were split
    checkpoint_group: Any = field(default=None, repr=False)   # the background checkpoint writes' own gloo group
    memory_before_model: int | None = None  # peak_memory_bytes() just before the model was built

    def __post_init__(self):
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sync_is_free(self) -> bool:
        """Reading a value from the device costs nothing (the CPU): check every step."""
        return self.device.type == "cpu"

    @property
    def build_device(self) -> torch.device:
        """Where to build the model: the host for FSDP (each block moves to the device as it is
        sharded, so the full model never has to fit one device), else the run's device."""
        return torch.device("cpu") if self.data_parallel == "fsdp" else self.device

    @property
    def peak_flops_total(self) -> float | None:
        return self.peak_flops * self.world_size if self.peak_flops else None

    def mfu(self, tokens_per_s: float, flops_per_token: float) -> tuple[float, float | None]:
        """``(achieved model FLOP/s, MFU)`` of the whole job; MFU is None where the peak is unknown."""
        flops = tokens_per_s * flops_per_token
        peak = self.peak_flops_total
        return flops, (flops / peak if peak else None)

    def local_batch(self, batch_size: int, what: str = "train.batch_size") -> int:
        """This rank's share of a global batch; refuses a batch that does not split evenly."""
        if batch_size % self.world_size:
            lo = batch_size - batch_size % self.world_size
            near = " or ".join(str(n) for n in sorted({lo, lo + self.world_size} - {0}))
            raise RuntimeSetupError(f"{what} ({batch_size}) is the global batch and must split evenly over "
                                    f"the {self.world_size} processes; use a multiple of {self.world_size} "
                                    f"(e.g. {near})")
        return batch_size // self.world_size

    # ---- the model ---------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """device -> precision -> activation checkpointing -> compile -> data-parallel wrap; returns the module
        to train."""
        if self.data_parallel != "fsdp":      # FSDP2 moves each unit to the device as it shards it
            model = model.to(self.device)
        if self.expert_parallel is not None:  # slices of the initialised weights, before anything wraps them
            self._split_experts(model)
        # precision: weights stay fp32 (master copy); autocast() and the GradScaler do the rest
        if self.activation_checkpointing:   # before compile and FSDP2, which then wrap the recomputed blocks
            checkpoint_blocks(model)
        if self.compile:   # one process: the whole model; data parallel: each block (overlap, sharding)
            compile_model(model, self.compile_mode, per_block=self.data_parallel is not None)
        if self.data_parallel == "ddp":
            model = dist_.wrap_ddp(model, self.device)
        elif self.data_parallel == "fsdp":
            if self.expert_parallel is not None:   # the experts on their own mesh first, then the blocks and root
                ep_.shard_experts(model, self.expert_parallel)
            model = dist_.wrap_fsdp(model, self.device, transformer_blocks(model))
        return model

    prepare_model = apply

    def _split_experts(self, model: nn.Module) -> None:
        n = self.expert_parallel.size
        self.full_params = count_params(model)
        try:
            ep_.apply_expert_parallel(model, self.expert_parallel.ep, self.expert_parallel.expert_dp)
        except ValueError as e:
            raise RuntimeSetupError(str(e)) from None
        if not ep_.expert_parallel_params(model):
            raise RuntimeSetupError(f"{ep_.KEY}: {n} needs a model with MoE layers (this one has none); "
                                    f"use --set {ep_.KEY}=1")

    def count_params(self, model: nn.Module) -> ParamReport:
        """The model's parameter counts, those of the whole model also when its experts are split."""
        return self.full_params if self.full_params is not None else count_params(model)

    def memory_budget(self, env=None) -> MemoryBudget:
        """What this process may still allocate on its device (see ``hardware.available_memory``)."""
        launch = Launch(rank=self.rank, local_rank=self.local_rank, world_size=self.world_size,
                        local_world_size=self.local_world_size)
        return available_memory(self.device, launch, env)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module under compile / DDP wrappers (an FSDP2 module is its own)."""
        return unwrap(model)

    def to_device(self, batch) -> tuple[torch.Tensor, ...]:
        tensors = tuple(torch.as_tensor(t) for t in batch)
        if self.is_cuda:
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    # ---- one training step -------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self):
        """Context for forward passes: autocast in reduced precision; compiler failures explained."""
        with compile_errors(self.compile):
            if self.precision == "fp32":
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.precision]):
                    yield

    def grad_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context of a micro-step: gradients are reduced across ranks only when ``sync`` (the last)."""
        return dist_.grad_sync(model, sync) if self.is_distributed else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        with compile_errors(self.compile):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def finish_grads(self, model: nn.Module) -> None:
        """After the last micro-step of an optimizer step (every rank): expert-parallel gradients averaged over
        all ranks, as DDP averages the others (``model``: the unwrapped module)."""
        if self.expert_parallel is None:
            return
        if self.data_parallel == "fsdp":    # FSDP2's reduce-scatter averaged them over dp
            ep_.finish_sharded_expert_grads(model, self.expert_parallel)
        else:
            ep_.sync_expert_grads(model, self.world_size, self.expert_parallel.expert_dp)

    def clip_grad_norm(self, optimizer, params, max_norm: float, model: nn.Module | None = None) -> torch.Tensor:
        """Unscale (fp16), clip to ``max_norm``; the global norm before clipping as a plain tensor.  Split experts
        (``model``, unwrapped, needed then) count in the norm over all ranks."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.expert_parallel is not None:
            return ep_.clip_grad_norm(model, self.expert_parallel, max_norm)
        return dist_.plain_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, optimizer) -> None:
        """``optimizer.step()``; with a GradScaler a step with inf/NaN gradients is skipped and the scale lowered."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    @property
    def scales_loss(self) -> bool:
        """Non-finite gradients are the GradScaler's business (only a non-finite loss is an error)."""
        return self.scaler is not None

    # ---- across ranks ------------------------------------------------------------------------
    def mean_over_ranks(self, *values: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Each tensor's mean over ranks (None stays None); one collective for all."""
        if not self.is_distributed:
            return values
        present = [v for v in values if v is not None]
        means = iter(dist_.all_reduce_mean(present)) if present else iter(())
        return tuple(None if v is None else next(means).to(v.dtype) for v in values)

    def any_rank(self, flag: bool) -> bool:
        return dist_.any_rank(flag) if self.is_distributed else flag

    def broadcast_text(self, text: str) -> str:
        return dist_.broadcast_text(text) if self.is_distributed else text

    def split_rng(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own random streams (dropout, router noise) after the
        shared model initialisation or a resume; rank 0 keeps the single-process stream."""
        if self.rank > 0:
            mixed = (seed * 1_000_003 + self.rank * 7_919 + step) % 2**63
            torch.manual_seed(mixed)
            np.random.seed(mixed % 2**32)
            random.seed(mixed)

    def close(self) -> None:
        """Leave the process group (after every rank got here).  Drop the wrapped model first:
        DDP and FSDP hold the group, which would otherwise outlive this call."""
        if self.is_distributed:
            gc.collect()          # the wrappers sit in reference cycles (hooks -> module)
            dist_.teardown()

    # ---- full state for checkpoints ----------------------------------------------------------
    @property
    def _experts_sharded(self) -> bool:
        """Split experts, themselves sharded by FSDP2 over the ranks holding the same ones."""
        return self.expert_parallel is not None and self.data_parallel == "fsdp"

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Unsharded weights on the main rank, None elsewhere (every rank must call it)."""
        if self.expert_parallel is not None:   # with FSDP2: gathered over its shards first, then over the experts
            local = dist_.full_model_state(model, self.is_main, everywhere=True) if self._experts_sharded else None
            return ep_.gather_full_experts_state(unwrap(model), local)
        return dist_.full_model_state(model, self.is_main)

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self._experts_sharded:
            dist_.load_full_model_state(model, ep_.local_experts_state(unwrap(model), state))
        elif self.expert_parallel is not None:
            ep_.load_local_experts(unwrap(model), state)
        else:
            dist_.load_full_model_state(model, state)

    def full_state_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The shapes of :meth:`model_state`'s tensors (a checkpoint's), without communication."""
        if self.expert_parallel is not None:
            return ep_.full_state_shapes(unwrap(model))
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def optimizer_state(self, model: nn.Module, optimizer, names: list[str]) -> dict[str, Any] | None:
        if self.expert_parallel is not None:
            local = (dist_.full_optimizer_state(model, optimizer, names, self.is_main, everywhere=True)
                     if self._experts_sharded else None)
            return ep_.gather_full_optimizer_state(unwrap(model), optimizer, local)
        return dist_.full_optimizer_state(model, optimizer, names, self.is_main)

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict[str, Any], names: list[str]) -> None:
        if self._experts_sharded:
            local = ep_.local_optimizer_state(unwrap(model), optimizer, state)
            dist_.load_full_optimizer_state(model, optimizer, local, names)
        elif self.expert_parallel is not None:
            ep_.load_local_optimizer_state(unwrap(model), optimizer, state)
        else:
            dist_.load_full_optimizer_state(model, optimizer, state, names)

    # ---- sharded checkpoints (each rank its own part; runtime/sharded.py) ----------------------
    @property
    def shards_by_default(self) -> bool:
        """``train.checkpoint_format: auto`` is sharded: FSDP or split experts (no rank holds the whole model)."""
        return self.data_parallel == "fsdp" or self.expert_parallel is not None

    def reshard(self, model: nn.Module) -> None:
        """FSDP2 units back to their sharded parameters (an evaluation's forward leaves the root unsharded)."""
        if self.data_parallel == "fsdp":
            dist_.reshard(model)

    def sharded_state(self, model: nn.Module, optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], list]:
        return sharded_.sharded_state(unwrap(model), optimizer, names, self.expert_parallel)

    def load_sharded_state(self, model: nn.Module, optimizer, names: list[str], metadata, read,
                           param_groups: list | None) -> None:
        sharded_.load_sharded_state(unwrap(model), optimizer, names, self.expert_parallel, metadata, read,
                                           param_groups)

    def write_shards_in_background(self, tensors: dict[str, torch.Tensor], folder) -> Any:
        """Start writing this rank's part of a sharded checkpoint (``train.async_checkpoint``); returns a wait()
        (collective: every rank calls it; the writes use a process group of their own)."""
        if self.is_distributed and self.checkpoint_group is None:
            self.checkpoint_group = dist_.new_gloo_group()
        return sharded_.write_in_background(tensors, folder, self.checkpoint_group)

    def state_dict(self) -> dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    # ---- reporting ---------------------------------------------------------------------------
    eager = staticmethod(eager)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int:
        """Peak accelerator memory, or the process's peak resident set on the CPU."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def note_memory_before_model(self) -> None:
        """Remember the peak so far (the interpreter, torch, the process group, the data): what the model adds is
        measured from here (:meth:`memory_per_rank`)."""
        self.memory_before_model = self.peak_memory_bytes()

    def memory_per_rank(self) -> list[tuple[int, int]]:
        """``(peak before the model was built, peak now)`` in bytes of every rank, in rank order (collective)."""
        mine = (self.memory_before_model or 0, self.peak_memory_bytes())
        return dist_.gather_ints(mine) if self.is_distributed else [mine]

    @property
    def memory_label(self) -> str:
        return "max allocated" if self.is_cuda else "max RSS"

    def describe(self) -> str:
        where = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.is_cuda else
                                    f" ({self.threads} threads{', host memory cached' if self.host_memory_cached else ''})")
        extra = [" + GradScaler" if self.scaler is not None else ""]
        if self.profile is not None and self.profile.precision == "auto":
            extra.append(" (precision auto)")
        if self.compile:
            extra.append(", compiled")
        if self.is_distributed:
            extra.append(f", {self.data_parallel} rank {self.rank}/{self.world_size}")
        if self.expert_parallel is not None:
            n = self.expert_parallel.size
            extra.append(f", experts split: ep {n} x dp {self.world_size // n}")
        return f"{where}, {self.precision}{''.join(extra)}"
