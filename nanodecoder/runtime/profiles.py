"""Runtime profiles as data: ``blueprints/profiles/<name>.yaml`` + the blueprint's overrides.

A blueprint's ``runtime`` section (:class:`RuntimeSpec`) names a profile and
may override any of its fields; ``--profile NAME`` and ``--set runtime.X=...``
change the same keys.  :func:`resolve_profile` loads the profile file,
validates it against ``schemas/profile.schema.json`` (the blueprint loader's
YAML reader, duplicate-key checks and messages), applies the overrides and
returns a complete :class:`Profile`.  Nothing here looks at the machine except
``auto``, which becomes ``gpu`` when CUDA is available and ``cpu`` otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal, get_args

import torch

from ..config import load_declared, suggest
from ..config.declare import declared, param
from ..resources import blueprints_dir

AUTO = "auto"
Precision = Literal["fp32", "bf16", "fp16", "mixed", "auto"]
PRECISIONS = get_args(Precision)


class RuntimeSetupError(RuntimeError):
    """The runtime cannot be set up as asked on this machine (the message says what to use instead)."""


@declared
class Profile:
    """Where and how a run executes: device, precision, compilation and data parallelism. Shipped profiles live in
    blueprints/profiles/<name>.yaml; a blueprint picks one with runtime.profile (or --profile NAME) and may override
    any field in its runtime section (--set runtime.compile=true). Applied in a fixed order: device, precision,
    compile, data-parallel wrap."""

    SCHEMA_TITLE = "Nanodecoder runtime profile"

    description: str = param(doc="One line saying what the profile is for (printed by --dry-run).", min_length=1)
    device: str = param("auto", doc="Torch device: 'cpu', 'cuda' (cuda:LOCAL_RANK under torchrun), 'cuda:N' (one "
                                    "process only), 'mps', or 'auto' (CUDA when available, else the CPU).",
                        pattern="^(auto|cpu|cuda(:[0-9]+)?|mps)$")
    precision: Precision = param(
        "fp32", doc="Compute precision of the forward pass (weights and optimizer stay fp32): 'fp32'; 'bf16' "
                    "autocast (needs a GPU with bf16, compute capability 8.0+, or the CPU); 'fp16' autocast with a "
                    "GradScaler (loss scaling); 'mixed' picks bf16 where supported and fp16 with a GradScaler "
                    "elsewhere; 'auto' picks bf16 where its matmuls are faster than fp32 (a GPU with bf16, a CPU "
                    "with AMX or AVX512-BF16: Intel Sapphire Rapids, Cooper Lake and newer, AMD Zen 4 and newer) "
                    "and fp32 elsewhere (bf16 on a CPU without either is about half as fast as fp32).")
    tf32: bool = param(False, doc="Let CUDA fp32 matmuls and convolutions use TF32 tensor cores (Ampere and "
                                  "newer); ignored on the CPU.")
    compile: bool = param(False, doc="torch.compile the model before the data-parallel wrap: the whole model in one "
                                     "process, each transformer block under DDP/FSDP (gradient reduction overlaps "
                                     "the backward; identical blocks share one graph); a compile failure stops the "
                                     "run with a message, set runtime.compile=false to run eagerly.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = param(
        "default", doc="torch.compile mode (used when compile is true).")
    data_parallel: Literal["ddp", "fsdp"] = param(
        "ddp", doc="How a job launched with torchrun (WORLD_SIZE > 1) splits the work: 'ddp' "
                   "(DistributedDataParallel, a full replica per process) or 'fsdp' (FSDP2 fully_shard per block: "
                   "parameters, gradients and optimizer state sharded). A single process ignores it.")
    expert_parallel: int = param(
        1, doc="Processes that split the routed experts of every MoE layer between them (expert parallelism over "
               "torchrun, DDP only): each holds n_experts / N experts of every layer and tokens travel to their "
               "experts' process and back (all_to_all); must divide the number of processes and every MoE layer's "
               "n_experts, with a built-in expert_kind. 1: every process holds every expert.", minimum=1)
    threads: int | None = param(None, doc="CPU threads for torch (torch.set_num_threads) per process; null keeps "
                                          "torch's default (torchrun sets OMP_NUM_THREADS=1 per process).", minimum=1)
    peak_flops: float | None = param(None, doc="Peak FLOP/s of one device for the MFU figure; null takes the "
                                               "datasheet number of a known GPU for the precision in use, or on the "
                                               "CPU a short matmul calibration at start-up.", exclusive_minimum=0)
    timeout_s: int = param(900, doc="Seconds a collective operation may wait for the other processes before the "
                                    "job fails (instead of hanging on a dead or stuck rank).", minimum=1)
    cache_host_memory: bool = param(
        False, doc="CPU runs: keep freed host memory in the process for reuse instead of giving it back to the "
                   "operating system (glibc mallopt: large blocks come from the heap, which is never trimmed). A CPU "
                   "training step allocates its large activations anew every step; fresh memory costs a page fault "
                   "per 4 KiB, which on small machines takes longer than the arithmetic on it (measured: exp over a "
                   "32 MiB tensor 10.2 -> 3.9 ms; dense_gpt steps ~7% faster on 2 cores). The process keeps its peak "
                   "memory until it exits; one process only (under torchrun the kept blocks piled up: FSDP 4 of a 218M "
                   "MoE reached 6.5 GiB on a rank planned for 1.7), several behave as false. false: blocks of 1 MiB "
                   "and more are given back when freed (fixed mallopt thresholds instead of glibc's drifting ones), "
                   "so the resident memory follows the memory plan. "
                   "No effect on GPU devices, where the C library is not glibc, or where MALLOC_MMAP_THRESHOLD_ or "
                   "MALLOC_TRIM_THRESHOLD_ is set.")
    activation_checkpointing: bool = param(
        False, doc="Recompute each transformer block's forward during the backward (torch.utils.checkpoint, "
                   "non-reentrant, RNG state preserved so dropout and router noise repeat exactly) instead of "
                   "keeping its activations: activation memory drops to each block's input plus one block's "
                   "activations, for about a third more compute (one more forward of every block); losses and "
                   "gradients are unchanged. python tools/param_count.py BLUEPRINT prints both memory plans.")
    check_memory: bool = param(
        True, doc="Refuse to train (exit 4, before the weights are built) when the memory plan -- weights, "
                  "gradients, optimizer state and activations of one micro-batch, per process -- exceeds the memory "
                  "available to the process: free GPU memory, or on the CPU the smaller of MemAvailable and the "
                  "cgroup limit (shared by the processes of a node). false: try anyway.")
    name: str = dataclasses.field(default="", metadata={})          # the file's name, set on load
    overridden: tuple[str, ...] = ()      # fields the blueprint / --set changed

    def summary(self) -> str:
        """``device cuda, precision mixed, tf32, compile, ddp`` (with ``*`` on overridden fields)."""
        def mark(field: str, text: str) -> str:
            return text + ("*" if field in self.overridden else "")
        parts = [mark("device", f"device {self.device}"), mark("precision", f"precision {self.precision}"),
                 mark("tf32", "TF32 on" if self.tf32 else "TF32 off"),
                 mark("compile", f"compile ({self.compile_mode})" if self.compile else "eager"),
                 mark("data_parallel", f"{self.data_parallel} under torchrun")]
        if self.expert_parallel > 1:
            parts.append(mark("expert_parallel", f"experts split over {self.expert_parallel} processes"))
        if self.threads:
            parts.append(mark("threads", f"{self.threads} threads"))
        if self.peak_flops:
            parts.append(mark("peak_flops", f"peak {self.peak_flops:.3g} FLOP/s"))
        if self.cache_host_memory:
            parts.append(mark("cache_host_memory", "host memory cached"))
        if self.activation_checkpointing:
            parts.append(mark("activation_checkpointing", "activation checkpointing"))
        if not self.check_memory:
            parts.append(mark("check_memory", "memory not checked"))
        return ", ".join(parts)


SETTINGS = tuple(f.name for f in dataclasses.fields(Profile) if "param" in f.metadata and f.name != "description")


def _override(f: dataclasses.Field) -> dataclasses.Field:
    """A profile setting as an optional override: same declaration, default None (keep the profile's)."""
    return dataclasses.field(default=None, metadata=f.metadata)


def profiles_dir() -> Path:
    return blueprints_dir() / "profiles"


def available_profiles() -> list[str]:
    """Names of the shipped profiles (``auto`` besides them)."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


RuntimeSpec = dataclasses.make_dataclass(
    "RuntimeSpec",
    [("profile", Literal[tuple([AUTO, *available_profiles()])], param(
        AUTO, doc="Runtime profile, a file in blueprints/profiles/ (see schemas/profile.schema.json): 'cpu' (fp32, "
                  "eager), 'gpu' (one CUDA GPU, fp32 + TF32), 'gpu_mixed' (bf16 autocast + TF32, fp16 with loss "
                  "scaling where bf16 is unsupported), 'multi_gpu_compile' (DDP over torchrun + torch.compile), "
                  "'fsdp' (FSDP2 per block over torchrun); 'auto' takes 'gpu' when CUDA is available and 'cpu' "
                  "otherwise. Data parallelism (DDP unless the profile says fsdp) switches on when the run is "
                  "launched with torchrun. --profile NAME on the command line overrides it."))]
    + [(f.name, Profile.__annotations__[f.name] + " | None", _override(f))
       for f in dataclasses.fields(Profile) if f.name in SETTINGS],
    namespace={"__doc__": "Where and how the run executes: a runtime profile plus overrides of any of its fields "
                          "(--set runtime.compile=true); a field that is absent or null keeps the profile's value.",
               "__module__": __name__,
               "overrides": lambda self: {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}},
    frozen=True, kw_only=True)


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> Profile:
    return load_declared(path, Profile)[0]


def load_profile(name: str, path: Path | None = None) -> Profile:
    """The profile ``name`` from ``blueprints/profiles/`` (or the file ``path``), validated.

    Raises ``BlueprintError`` (with file, key and line) for an invalid file and
    ``RuntimeSetupError`` for an unknown name.
    """
    path = Path(path) if path is not None else profiles_dir() / f"{name}.yaml"
    if not path.is_file():
        names = available_profiles()
        raise RuntimeSetupError(f"unknown runtime profile '{name}'{suggest(name, names + [AUTO])} "
                                f"(available: {AUTO}, {', '.join(names)})")
    return dataclasses.replace(_load(path.resolve()), name=name)


def auto_profile_name(device: str | None = None) -> str:
    """``auto``: the profile for an overridden device, else ``gpu`` with CUDA and ``cpu`` without."""
    if device not in (None, "auto"):
        return "cpu" if device == "cpu" else "gpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_profile(spec: RuntimeSpec | None = None) -> Profile:
    """The blueprint's profile (``auto`` resolved on this machine) with its overrides applied."""
    spec = spec or RuntimeSpec()
    name = auto_profile_name(spec.device) if spec.profile == AUTO else spec.profile
    base = load_profile(name)
    overrides = spec.overrides()
    if base.device == "cpu" and spec.device not in (None, "cpu"):
        raise RuntimeSetupError(f"runtime.profile '{spec.profile}' cannot run on device '{spec.device}' "
                                "(the profile is CPU only); use --profile gpu (or gpu_mixed), or runtime.profile: auto")
    changed = tuple(k for k, v in overrides.items() if getattr(base, k) != v)
    profile = dataclasses.replace(base, **overrides, overridden=changed)
    if spec.profile == AUTO:
        profile = dataclasses.replace(profile, name=f"auto -> {name}")
    return profile
