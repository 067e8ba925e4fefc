"""What this machine offers: this process's place in the job, its device, the precision it can
run and its peak FLOP/s (for MFU).  The checks raise ``RuntimeSetupError`` before anything
is built, with the profile to use instead."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping

import torch

from .profiles import Profile, RuntimeSetupError


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, from the environment torchrun sets."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1     # processes on this node (they share its host memory)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Launch":
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", 1))
            rank = int(env.get("RANK", 0))
            local = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError as e:
            raise RuntimeSetupError(f"bad torchrun environment ({e}); launch with torchrun") from None
        if world < 1 or not 0 <= rank < world:
            raise RuntimeSetupError(f"RANK {rank} / WORLD_SIZE {world} is not a valid process; launch with torchrun")
        if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise RuntimeSetupError(f"WORLD_SIZE is {world} but MASTER_ADDR/MASTER_PORT are not set: start "
                                    f"distributed runs with torchrun, e.g. torchrun --nproc_per_node={world} "
                                    "-m nanodecoder.run BLUEPRINT")
        return cls(rank=rank, local_rank=local, world_size=world, local_world_size=max(1, min(local_world, world)))


#: bytes (``24GiB``, ``1.5e9``) that replace the measured memory available to the process (tests, planning)
MEMORY_ENV = "NANODECODER_AVAILABLE_MEMORY"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"80 GB"``, ``"1.5e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    except (AttributeError, KeyError, ValueError):
        raise RuntimeSetupError(f"{MEMORY_ENV}={text!r} is not a size in bytes (e.g. 24GiB, 80GB, 1.5e9)") from None


@dataclass(frozen=True)
class MemoryBudget:
    """What one process may still allocate on its device: ``bytes`` (None: unknown here) and where it comes from."""
    bytes: int | None
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None          # cgroup v2 writes "max" for no limit


def mem_available(root: Path = Path("/")) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_free(root: Path = Path("/")) -> int | None:
    """Bytes this process's memory cgroup still allows: limit - usage at the tightest level of its cgroup and
    the levels above it (v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` -
    ``memory.usage_in_bytes``); None without a limit."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    free = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, limit, usage = root / "sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit, usage = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        rel = PurePosixPath(path.strip().lstrip("/"))
        for level in {base / rel, *(base / p for p in rel.parents)}:   # a container sees its own as the root
            lim, used = _read_int(level / limit), _read_int(level / usage)
            if lim is not None and used is not None:
                free.append(max(lim - used, 0))
    return min(free) if free else None


def available_memory(device: torch.device, launch: Launch | None = None, env: Mapping[str, str] | None = None,
                     root: Path = Path("/")) -> MemoryBudget:
    """Memory this process may still allocate: ``NANODECODER_AVAILABLE_MEMORY`` when set; on a GPU its free
    memory (``torch.cuda.mem_get_info``); on the CPU the smaller of ``MemAvailable`` and the cgroup's
    remaining limit, divided among the processes of this node."""
    env = os.environ if env is None else env
    launch = launch or Launch()
    if env.get(MEMORY_ENV):
        return MemoryBudget(parse_bytes(env[MEMORY_ENV]), f"{MEMORY_ENV}={env[MEMORY_ENV]}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return MemoryBudget(int(free), f"free on {device} ({torch.cuda.get_device_name(device)})")
    if device.type != "cpu":
        return MemoryBudget(None, f"unknown on '{device.type}'")
    found = {"MemAvailable": mem_available(root), "the cgroup limit": cgroup_free(root)}
    found = {name: n for name, n in found.items() if n is not None}
    if not found:
        return MemoryBudget(None, "unknown on this system (no /proc/meminfo, no cgroup limit)")
    name, host = min(found.items(), key=lambda item: item[1])
    other = {"MemAvailable": "the cgroup limit allows more", "the cgroup limit": "below MemAvailable"}[name]
    source = f"host memory: {name}" + (f", {other}" if len(found) > 1 else "")
    if launch.local_world_size > 1:
        return MemoryBudget(host // launch.local_world_size,
                            f"{source}, shared by the {launch.local_world_size} processes of this node")
    return MemoryBudget(host, source)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # mallopt parameters of glibc's <malloc.h>


#: glibc's own environment settings of the same thresholds; where the user set one, it is left alone
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc ``mallopt`` of both thresholds (fixed: glibc's dynamic adjustment stops); False where the C
    library has none (not glibc: macOS, musl), refuses them, or the environment already sets them."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@functools.lru_cache(maxsize=1)
def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: blocks of any size below 1 GiB come from
    the heap instead of their own ``mmap``, and the heap is never trimmed.  Otherwise each large
    tensor a training step allocates is fresh memory from the kernel, zeroed page by page on
    first touch (a page fault per 4 KiB).  False where it cannot (see ``_set_malloc``).
    Process-wide, once."""
    return _set_malloc(1 << 30, 2**31 - 1)


@functools.lru_cache(maxsize=1)
def return_freed_host_memory() -> bool:
    """The opposite: blocks of 1 MiB and more get their own ``mmap`` and go back to the kernel when freed,
    and the heap is trimmed once 16 MiB at its top are free, so the resident memory follows what the tensors
    hold.  glibc's default instead raises its mmap threshold to the size of each large block freed (up to
    32 MiB), after which a step's large tensors come from the heap and their freed space stays resident,
    scattered between live blocks (4 gloo processes training a 218M-parameter MoE: 4-25% above the memory
    plan, against -9% to +12% with these settings).  Process-wide, once."""
    return _set_malloc(1 << 20, 16 << 20)


def _no_cuda(profile: Profile) -> str:
    build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
    return (f"runtime profile '{profile.name}' (device {profile.device}) needs a CUDA GPU, but CUDA is not "
            f"available on this machine ({build}); use --profile cpu, or runtime.profile: auto")


def pick_device(profile: Profile, launch: Launch) -> torch.device:
    """The device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    want = profile.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(want)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeSetupError(_no_cuda(profile))
        count = torch.cuda.device_count()
        if launch.world_size > 1:
            if dev.index is not None:
                raise RuntimeSetupError(f"runtime.device '{want}' names one GPU, but torchrun started "
                                        f"{launch.world_size} processes; use device: cuda (each process "
                                        "takes cuda:LOCAL_RANK)")
            if launch.local_rank >= count:
                raise RuntimeSetupError(f"LOCAL_RANK {launch.local_rank} has no GPU: this node shows {count}; "
                                        f"use torchrun --nproc_per_node={count} (or fewer)")
            return torch.device("cuda", launch.local_rank)
        index = dev.index if dev.index is not None else 0
        if index >= count:
            raise RuntimeSetupError(f"runtime.device '{want}' does not exist: this machine shows {count} "
                                    f"GPU{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeSetupError("runtime.device is 'mps' but MPS is not available on this machine; "
                                    "use --profile cpu")
        if launch.world_size > 1:
            raise RuntimeSetupError("distributed runs on 'mps' are not supported; use --profile cpu under torchrun")
    return dev


def cpu_has_fast_bf16() -> bool:
    """This CPU multiplies bf16 matrices with native bf16 instructions, which torch's oneDNN uses: AMX tiles
    (Intel Sapphire Rapids and newer, where the OS enables them) or AVX512-BF16 dot products (Intel Cooper
    Lake, AMD Zen 4 and newer).  Measured on 2 cores against fp32's 145-250 GFLOP/s: AMX ~480-1,100 on 1024^3
    and ~680 on a 768 x 128 x 512 step; AVX512-BF16 (AMD EPYC) 380-430 on the same shapes.  Without either,
    oneDNN emulates bf16 and a bf16 matmul runs at about half the fp32 speed (~140 GFLOP/s)."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def auto_precision(device_type: str) -> str:
    """What ``precision: auto`` becomes on a device of this type here: bf16 autocast where its matmuls are fast
    (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), fp32 elsewhere."""
    if device_type == "cuda":     # planned on a machine without CUDA: the GPUs runs are planned for have bf16
        return "fp32" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False) \
            else "bf16"
    return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "fp32"


def planned_precision(precision: str, device_type: str) -> str:
    """A profile's precision with 'auto' resolved for a device of this type (for plans made without set-up)."""
    return auto_precision(device_type) if precision == "auto" else precision


def planned_device_type(profile: Profile) -> str:
    """The device type a plan made without set-up assumes for ``profile``: a cpu profile's CPU, any other a
    CUDA GPU."""
    return "cpu" if profile.device == "cpu" else "cuda"


def profile_precision(profile: Profile) -> str:
    """The precision a plan made without set-up assumes for ``profile`` ('auto' resolved for
    :func:`planned_device_type`)."""
    return planned_precision(profile.precision, planned_device_type(profile))


def pick_precision(profile: Profile, device: torch.device) -> str:
    """fp32, bf16 or fp16 for this device ('mixed' and 'auto' resolved); refuses bf16 where it cannot run."""
    want = profile.precision
    if want == "auto":
        return auto_precision(device.type)
    if want == "fp32":
        return want
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if want == "mixed":
            return "bf16" if ok else "fp16"
        if want == "bf16" and not ok:
            major, minor = torch.cuda.get_device_capability(device)
            raise RuntimeSetupError(
                f"runtime.precision 'bf16' needs a GPU with bf16 (compute capability 8.0 or newer: A100, H100, "
                f"RTX 30xx/40xx); {torch.cuda.get_device_name(device)} has {major}.{minor}; use --profile "
                "gpu_mixed (fp16 with loss scaling on this GPU) or --profile gpu (fp32)")
        return want
    if device.type == "cpu":
        return "bf16" if want == "mixed" else want
    raise RuntimeSetupError(f"runtime.precision '{want}' is not supported on '{device.type}'; "
                            "use --set runtime.precision=fp32")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for CUDA fp32 matmuls and convolutions (cuBLAS and cuDNN only; CPU matmuls untouched).

    The ``allow_tf32`` flags, not the per-backend ``fp32_precision`` of torch >= 2.9: setting only
    ``torch.backends.cuda.matmul.fp32_precision`` makes ``torch.get_float32_matmul_precision()``,
    which inductor reads, raise ("mix of the legacy and new APIs") in torch 2.13; the flags
    keep both views consistent."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


# Dense peak FLOP/s per GPU (no structured sparsity), from NVIDIA's datasheets: "NVIDIA A100
# Tensor Core GPU", "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core GPU" (their
# tensor-core figures are quoted with 2:4 sparsity; halved here), and the GeForce architecture
# whitepapers (Ampere GA102, Ada AD102/AD103: "FP16/BF16 Tensor TFLOPS with FP32 Accumulate",
# which is what torch uses; the RTX 3080 Ti row is the GA102 per-SM rate x 80 SMs x boost clock).
# Columns: bf16/fp16 tensor, tf32 tensor, fp32 (CUDA cores).  First matching name wins.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float, float], ...] = (
    ("H200 NVL", 835.5e12, 417.5e12, 60.0e12),
    ("H200", 989.5e12, 494.5e12, 67.0e12),
    ("H100 NVL", 835.5e12, 417.5e12, 60.0e12),
    ("H100 PCIe", 756.5e12, 378.0e12, 51.0e12),
    ("H100", 989.5e12, 494.5e12, 67.0e12),       # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312.0e12, 156.0e12, 19.5e12),       # SXM4 and PCIe, 40 and 80 GB
    ("RTX 4090", 165.2e12, 82.6e12, 82.6e12),
    ("RTX 4080", 97.5e12, 48.7e12, 48.7e12),
    ("RTX 3090 Ti", 80.0e12, 40.0e12, 40.0e12),
    ("RTX 3090", 71.0e12, 35.6e12, 35.6e12),
    ("RTX 3080 Ti", 68.2e12, 34.1e12, 34.1e12),
    ("RTX 3080", 59.5e12, 29.8e12, 29.8e12),
    ("RTX 3070", 40.6e12, 20.3e12, 20.3e12),
)


def gpu_peak_flops(name: str, precision: str, tf32: bool) -> float | None:
    """Datasheet peak of the GPU called ``name`` for the math that ``precision`` / ``tf32`` use."""
    for pattern, half, tf, fp32 in GPU_PEAK_FLOPS:
        if pattern in name:
            return half if precision in ("bf16", "fp16") else tf if tf32 else fp32
    return None


_CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def calibrate_cpu(precision: str = "fp32", threads: int = 1, seconds: float = 0.3, n: int = 1024) -> float:
    """FLOP/s of ``n`` x ``n`` matmuls in ``precision`` on this CPU for about ``seconds`` (cached per
    process and thread count): the CPU's practical peak for MFU."""
    dtype = _CPU_DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)                 # warm-up: thread pool, packing buffers
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n ** 3 * count / elapsed


def peak_flops(profile: Profile, device: torch.device, precision: str) -> tuple[float | None, str]:
    """``(peak FLOP/s of one device, where the number comes from)``; None when unknown."""
    if profile.peak_flops:
        return float(profile.peak_flops), "runtime.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision, profile.tf32)
        if peak is None:
            return None, f"unknown GPU '{name}': set runtime.peak_flops to report MFU"
        math = precision if precision != "fp32" else ("tf32" if profile.tf32 else "fp32")
        return peak, f"{name} datasheet, dense {math}"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return calibrate_cpu(precision, threads), f"calibrated: {precision} 1024x1024 matmuls, {threads} threads"
    return None, f"no peak known for '{device.type}': set runtime.peak_flops to report MFU"
