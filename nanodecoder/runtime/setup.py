"""Resolve a profile on this machine: checks first (nothing built yet), then the process's set-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from . import expert_parallel
from .core import Runtime
from .distributed import init_process_group
from .hardware import (Launch, keep_freed_host_memory, peak_flops, pick_device, pick_precision, profile_precision,
                       return_freed_host_memory, set_tf32)
from .profiles import Profile, RuntimeSetupError, RuntimeSpec, resolve_profile


def _check(profile: Profile, launch: Launch) -> tuple[torch.device, str, str | None]:
    """``(device, precision, data_parallel)`` or RuntimeSetupError saying what to use instead."""
    device = pick_device(profile, launch)
    precision = pick_precision(profile, device)
    data_parallel = profile.data_parallel if launch.world_size > 1 else None
    if data_parallel == "fsdp" and precision == "fp16":
        raise RuntimeSetupError("FSDP with fp16 loss scaling is not supported (each rank would see only its "
                                "shard's overflows); use --set runtime.precision=bf16 on a GPU with bf16, or "
                                "--set runtime.precision=fp32, or --profile multi_gpu_compile (DDP)")
    if profile.expert_parallel > 1:
        _check_expert_parallel(profile.expert_parallel, launch.world_size, precision)
    return device, precision, data_parallel


def _check_expert_parallel(n: int, world: int, precision: str) -> None:
    try:
        expert_parallel.check_degree(n, world)
    except ValueError as e:
        raise RuntimeSetupError(f"{e} (launch with torchrun --nproc_per_node=N)" if world == 1 else str(e)) from None
    if precision == "fp16":
        raise RuntimeSetupError(f"{expert_parallel.KEY} with fp16 loss scaling is not supported (each rank "
                                "would see only its experts' overflows); use --set runtime.precision=bf16 or fp32")


def setup_runtime(spec: RuntimeSpec | None = None, *, env: Mapping[str, str] | None = None) -> Runtime:
    """Check the profile against this machine, then set the process up (threads, CUDA device,
    TF32, process group under torchrun) and measure or look up the peak FLOP/s.  Call once per
    process, before building the model; raises RuntimeSetupError before anything is trained."""
    profile = resolve_profile(spec)
    launch = Launch.from_env(env)
    device, precision, data_parallel = _check(profile, launch)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_tf32(device, profile.tf32)
    # one process only: under torchrun the kept blocks pile up (FSDP 4 of a 218M MoE: 6.5 GiB on a rank planned
    # for 1.7, killed by the kernel), so several processes give freed memory back as cache_host_memory: false
    cache = profile.cache_host_memory and launch.world_size == 1
    cached = cache and device.type == "cpu" and keep_freed_host_memory()
    if device.type == "cpu" and not cache:
        return_freed_host_memory()
    groups = None
    if launch.world_size > 1:
        init_process_group(device, launch.rank, launch.world_size, profile.timeout_s)
        if profile.expert_parallel > 1:
            groups = expert_parallel.expert_parallel_groups(profile.expert_parallel, device.type)
    peak, source = peak_flops(profile, device, precision)
    return Runtime(device=device, precision=precision, rank=launch.rank, world_size=launch.world_size,
                   threads=torch.get_num_threads(), local_rank=launch.local_rank, data_parallel=data_parallel,
                   compile=profile.compile, compile_mode=profile.compile_mode, peak_flops=peak,
                   peak_source=source, profile=profile, host_memory_cached=cached,
                   activation_checkpointing=profile.activation_checkpointing,
                   local_world_size=launch.local_world_size, expert_parallel=groups)


@dataclass(frozen=True)
class Target:
    """Where a run would execute on this machine, resolved without setting anything up."""
    profile: Profile
    launch: Launch
    device: torch.device | None     # None: the profile cannot run here (``problem`` says why)
    precision: str                  # resolved where the device is known, else the profile's
    data_parallel: str | None
    problem: str | None = None


def resolve_target(spec: RuntimeSpec | None = None, env: Mapping[str, str] | None = None) -> Target:
    """The profile, this process's place in the job, its device and precision -- or why it cannot run here."""
    profile = resolve_profile(spec)
    try:
        launch = Launch.from_env(env)
        device, precision, data_parallel = _check(profile, launch)
    except RuntimeSetupError as e:
        return Target(profile, Launch(), None, profile_precision(profile), None, str(e))
    return Target(profile, launch, device, precision, data_parallel)


def describe_plan(spec: RuntimeSpec | None = None, env: Mapping[str, str] | None = None) -> str:
    """What the runtime would do here (for ``--dry-run``): the profile, then this machine's
    outcome or the error a run would stop with.  Sets nothing up."""
    target = resolve_target(spec, env)
    profile = target.profile
    lines = [f"runtime profile '{profile.name}': {profile.description}",
             f"  settings       {profile.summary()}" + ("  (* = overridden)" if profile.overridden else ""),
             "  order          device -> precision -> activation checkpointing -> compile -> data-parallel wrap"]
    if target.problem is not None:
        lines.append(f"  on this machine: cannot run: {target.problem}")
        return "\n".join(lines)
    scaler = " with a GradScaler" if target.precision == "fp16" else ""
    dp = (f"{target.data_parallel} over {target.launch.world_size} processes" if target.data_parallel else
          f"one process (under torchrun: {profile.data_parallel})")
    lines.append(f"  on this machine: {target.device}, {target.precision}{scaler}, {dp}")
    return "\n".join(lines)
