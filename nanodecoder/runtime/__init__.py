"""The runtime layer: where and how a run executes.

For now one small module: pick the device from the ``runtime`` blueprint section,
set CPU threads, and describe precision, autocast and the process's place in a
(future) distributed job.  The trainer calls :func:`setup_runtime` once and asks
the returned :class:`Runtime` for everything device-related; GPU, precision,
compile and DDP profiles will extend this module without touching the trainer.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

PROFILES = ("auto", "cpu")


@dataclass(frozen=True)
class RuntimeSpec:
    profile: str = "auto"
    device: str = "auto"
    threads: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "RuntimeSpec":
        return cls(**dict(raw or {}))


class RuntimeSetupError(RuntimeError):
    """The requested device is not usable here."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1
    threads: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: a no-op in fp32, autocast for reduced precision."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (compile / DDP wrapping comes here later)."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module under compile / DDP wrappers."""
        while True:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            if not isinstance(inner, nn.Module):
                return model
            model = inner

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int:
        """Peak accelerator memory, or the process's peak resident set on the CPU."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def describe(self) -> str:
        where = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.is_cuda else
                                    f" ({self.threads} threads)")
        dist = f", rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return f"{where}, {self.precision}{dist}"


def _pick_device(spec: RuntimeSpec) -> torch.device:
    if spec.profile == "cpu":
        if spec.device not in ("auto", "cpu"):
            raise RuntimeSetupError(f"runtime.profile 'cpu' cannot run on device '{spec.device}'; "
                                "set runtime.device: cpu or runtime.profile: auto")
        return torch.device("cpu")
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError(f"runtime.device is '{spec.device}' but CUDA is not available on this machine; "
                            "use runtime.device: auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeSetupError("runtime.device is 'mps' but MPS is not available on this machine")
    return dev


def setup_runtime(spec: RuntimeSpec | None = None) -> Runtime:
    """Resolve the device, set CPU threads; call once per process before building the model."""
    spec = spec or RuntimeSpec()
    if spec.profile not in PROFILES:
        raise RuntimeSetupError(f"unknown runtime.profile '{spec.profile}' (available: {', '.join(PROFILES)})")
    device = _pick_device(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise RuntimeSetupError("distributed runs (WORLD_SIZE > 1) need a DDP runtime profile, not available yet")
    return Runtime(device=device, precision="fp32", rank=rank, world_size=world,
                   threads=torch.get_num_threads())
