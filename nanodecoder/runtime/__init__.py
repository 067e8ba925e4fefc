"""The runtime layer: where and how a run executes, chosen by a profile, not by code.

* ``profiles.py``  profiles as data (``blueprints/profiles/*.yaml``, validated by
  ``schemas/profile.schema.json``) + the blueprint's ``runtime`` overrides;
* ``hardware.py``  this process's device and precision (checked before anything
  is built), the memory it may allocate, and the peak FLOP/s for MFU (GPU datasheets, CPU
  calibration);
* ``setup.py``     :func:`setup_runtime` (once per process) and the dry-run plan;
* ``core.py``      :class:`Runtime`: ``apply(model)`` in the fixed order device ->
  precision -> activation checkpointing -> compile -> data-parallel wrap, and what one
  training step needs;
* ``distributed.py`` / ``compile.py``  the torch.distributed and torch.compile parts.

The command-line layer calls :func:`setup_runtime` once per process; the trainer asks the returned
:class:`Runtime` for everything device-related.
"""
from __future__ import annotations

from .compile import CompileFailed, graphs_compiled
from .core import Runtime, rng_state, set_rng_state
from .hardware import (GPU_PEAK_FLOPS, MEMORY_ENV, Launch, MemoryBudget, available_memory, calibrate_cpu,
                       gpu_peak_flops, planned_device_type, planned_precision, profile_precision)
from .profiles import (AUTO, Profile, RuntimeSetupError, RuntimeSpec, available_profiles, load_profile,
                       resolve_profile)
from .setup import Target, describe_plan, resolve_target, setup_runtime


__all__ = ["AUTO", "CompileFailed", "GPU_PEAK_FLOPS", "Launch", "MEMORY_ENV", "MemoryBudget", "Profile", "Runtime",
           "RuntimeSetupError", "RuntimeSpec", "Target", "available_memory", "available_profiles", "calibrate_cpu",
           "describe_plan", "gpu_peak_flops", "graphs_compiled", "load_profile", "planned_device_type",
           "planned_precision", "profile_precision", "resolve_profile", "resolve_target", "rng_state", "set_rng_state",
           "setup_runtime"]
