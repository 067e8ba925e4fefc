"""A training run's memory plan, checked against what the process may allocate -- before anything is built.

The plan (``model.plan``) is per process: its micro-batch is ``train.batch_size / world_size`` sequences of
``context_length`` tokens; FSDP shards weights, gradients and optimizer state over the processes;
``runtime.expert_parallel: N`` splits every MoE layer's routed experts (and their gradients and optimizer state)
over N processes.
``--dry-run`` prints it (:meth:`MemoryCheck.report`); training refuses with :class:`WontFit` when it does not
fit, unless ``runtime.check_memory`` is false.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from ..model.plan import Plan, Setting, expert_parallel_degrees, human_bytes, plan
from ..model.spec import ModelSpec
from ..runtime import (MemoryBudget, Runtime, RuntimeSetupError, RuntimeSpec, available_memory, planned_device_type,
                       resolve_target)
from .spec import TrainSpec

OVERRIDE = "--set runtime.check_memory=false"
FSDP_SIZES = tuple(2 ** i for i in range(1, 13))     # 2 .. 4096 devices


class WontFit(RuntimeError):
    """The memory plan exceeds what the process may allocate (the message names both and the override)."""


def run_setting(model: ModelSpec, train: TrainSpec, *, precision: str, device: str, world_size: int = 1,
                data_parallel: str | None = None, checkpointing: bool = False, expert_parallel: int = 1) -> Setting:
    """The plan's setting of a training run: this process's micro-batch at the model's context length."""
    return Setting(context=model.context_length, batch=max(1, train.batch_size // world_size), precision=precision,
                   optimizer_states=train.optimizer.states_per_param, optimizer=train.optimizer.kind,
                   world_size=world_size, sharded=data_parallel == "fsdp" and world_size > 1,
                   expert_parallel=expert_parallel, checkpointing=checkpointing, device=device)


def _plan(model: ModelSpec, setting: Setting) -> Plan:
    try:
        return plan(model, setting)
    except ValueError as e:         # an expert-parallel degree the model's experts cannot split by
        raise RuntimeSetupError(str(e)) from None


@dataclass(frozen=True)
class MemoryCheck:
    plan: Plan
    budget: MemoryBudget          # bytes None: the device is not here (``budget.source`` says why)

    @property
    def needed(self) -> float:
        return self.plan.memory().total

    @property
    def fits(self) -> bool | None:
        """None where the plan cannot be checked on this machine."""
        return None if self.budget.bytes is None else self.needed <= self.budget.bytes

    def report(self) -> str:
        """The whole plan, the memory available and the verdict."""
        lines = [f"memory plan per process: {self.plan.setting.describe()}", self.plan.memory_table()]
        if self.budget.bytes is None:
            lines.append(f"  cannot be checked against the device here: {self.budget.source}")
            return "\n".join(lines)
        lines.append(f"  available: {human_bytes(self.budget.bytes)} ({self.budget.source})")
        if self.fits:
            lines.append(f"  fits: {human_bytes(self.needed)} of {human_bytes(self.budget.bytes)} "
                         f"({self.needed / self.budget.bytes:.0%})")
        else:
            lines.append(f"  does not fit: {self.shortfall()}")
        return "\n".join(lines)

    def shortfall(self) -> str:
        """What does not fit, and what would."""
        avail, mem, st = self.budget.bytes, self.plan.memory(), self.plan.setting
        said = (f"the plan needs {human_bytes(mem.total)} per process (weights {human_bytes(mem.weights)}, "
                f"gradients {human_bytes(mem.gradients)}, optimizer state {human_bytes(mem.optimizer)}, "
                f"activations {human_bytes(mem.activations)}), {human_bytes(avail)} available")
        if mem.model_state > avail:
            said += (f"; the weights, gradients and optimizer state alone need {human_bytes(mem.model_state)}")
        elif not st.checkpointing and self.plan.memory(True).total <= avail:
            said += (f"; the activations do not fit: --set runtime.activation_checkpointing=true needs "
                     f"{human_bytes(self.plan.memory(True).total)}, or lower train.batch_size (raise "
                     "train.grad_accum to keep the tokens per step)")
        else:
            said += "; lower train.batch_size (raise train.grad_accum to keep the tokens per step)"
        split = self.expert_parallel_degree()
        if split is not None:
            needs = self.expert_parallel_plan(split).memory().total
            said += (f"; splitting the experts over {split} of the {st.world_size} processes would fit "
                     f"(--set runtime.expert_parallel={split}: {human_bytes(needs)} per process)")
        ranks = self.fsdp_devices()
        if ranks is not None and ranks > st.world_size:
            said += (f"; FSDP with activation checkpointing over {ranks} devices of this size would fit "
                     f"(torchrun --nproc_per_node=... --profile fsdp)")
        elif ranks is None:
            widest = self.fsdp_plan(FSDP_SIZES[-1]).memory()
            said += (f"; FSDP would not fit on any number of devices of this size: each keeps "
                     f"{human_bytes(widest.gathered)} of unsharded buffers (the root's and two blocks' weights, two "
                     f"blocks' gradients) and {human_bytes(widest.activations)} of activations with checkpointing")
        return said

    def expert_parallel_plan(self, degree: int) -> Plan:
        """This plan with every MoE layer's routed experts split over ``degree`` of its processes."""
        return plan(self.plan.spec, dataclasses.replace(self.plan.setting, expert_parallel=degree))

    def expert_parallel_degree(self) -> int | None:
        """The smallest expert-parallel degree above the run's (of its processes, dividing the experts) that fits."""
        st = self.plan.setting
        if st.sharded:                   # expert parallelism runs under DDP only
            return None
        return next((n for n in expert_parallel_degrees(self.plan.spec, st.world_size) if n > st.expert_parallel
                     and self.expert_parallel_plan(n).memory().total <= self.budget.bytes), None)

    def fsdp_plan(self, devices: int) -> Plan:
        """This plan under FSDP over ``devices`` with activation checkpointing (the same per-device batch)."""
        return plan(self.plan.spec, dataclasses.replace(self.plan.setting, world_size=devices, sharded=True,
                                                        expert_parallel=1, checkpointing=True))

    def fsdp_devices(self) -> int | None:
        """The fewest devices of this size (up to 4096) over which :meth:`fsdp_plan` fits."""
        return next((n for n in FSDP_SIZES if self.fsdp_plan(n).memory().total <= self.budget.bytes), None)

    def refusal(self) -> str:
        return (f"the run does not fit in memory: {self.shortfall()} ({self.budget.source}). Nothing was built; "
                f"{OVERRIDE} tries anyway")


def planned_check(model: ModelSpec, train: TrainSpec, runtime: RuntimeSpec | None = None,
                  env: Mapping[str, str] | None = None) -> MemoryCheck:
    """The memory check of a run as it would execute on this machine, with nothing set up (``--dry-run``)."""
    target = resolve_target(runtime, env)
    profile = target.profile
    device = target.device.type if target.device is not None else planned_device_type(profile)
    setting = run_setting(model, train, precision=target.precision, device=device,
                          world_size=target.launch.world_size, data_parallel=target.data_parallel,
                          checkpointing=profile.activation_checkpointing,
                          expert_parallel=profile.expert_parallel if target.problem is None else 1)
    budget = (MemoryBudget(None, target.problem) if target.device is None
              else available_memory(target.device, target.launch, env))
    return MemoryCheck(_plan(model, setting), budget)


def runtime_check(model: ModelSpec, train: TrainSpec, runtime: Runtime,
                  env: Mapping[str, str] | None = None) -> MemoryCheck:
    """The memory check of a run on the runtime that was set up (before the model is built)."""
    setting = run_setting(model, train, precision=runtime.precision, device=runtime.device.type,
                          world_size=runtime.world_size, data_parallel=runtime.data_parallel,
                          checkpointing=runtime.activation_checkpointing,
                          expert_parallel=runtime.expert_parallel.size if runtime.expert_parallel else 1)
    return MemoryCheck(_plan(model, setting), runtime.memory_budget(env))


def refuse_if_too_big(model: ModelSpec, train: TrainSpec, runtime: Runtime,
                      env: Mapping[str, str] | None = None) -> MemoryCheck:
    """Raise :class:`WontFit` when the run's plan exceeds the memory available (unless runtime.check_memory is
    false)."""
    check = runtime_check(model, train, runtime, env)
    enabled = runtime.profile is None or runtime.profile.check_memory
    if enabled and check.fits is False:
        raise WontFit(check.refusal())
    return check
