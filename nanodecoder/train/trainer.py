"""The mechanics of training: one optimizer step, one evaluation, the full state.

:class:`Trainer` owns the optimizer, the schedule and the training batch
sampler of one model.  It knows nothing about run directories, logging or
checkpoint files (``loop.py`` drives it; ``tools/bench.py`` times its steps).
The step is lean: no host-device sync except the non-finite check on the CPU
(where it is free) or with ``nan_policy: skip`` (where it is needed); gradients
are freed with ``set_to_none``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import BatchSampler, bits_per_byte
from ..model.plan import flops_per_token
from ..runtime import rng_state, set_rng_state
from .optim import AdamW, build_optimizer, param_names
from .schedule import build_schedule, set_lr
from .spec import TrainSpec


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf (``nan_policy: stop``, or too many skips)."""

    def __init__(self, step: int, detail: str = ""):
        self.step = step
        super().__init__(f"non-finite loss (NaN or inf) at step {step}{detail}; the run was stopped. "
                         "Lower train.lr, raise warm-up, check the data, or set train.nan_policy: skip")


class StateMismatch(Exception):
    """A saved training state does not fit this trainer (other parameters or optimizer)."""


@dataclass
class StepOutput:
    loss: torch.Tensor                      # mean cross-entropy of the step's micro-batches (detached)
    lr: float
    aux_loss: torch.Tensor | None = None    # mean weighted auxiliary loss (MoE), detached
    grad_norm: torch.Tensor | None = None   # global norm before clipping
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # model stats of the last micro-batch
    skipped: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Optimizer + schedule + batches for ``model``; ``step()`` runs one optimizer step."""

    def __init__(self, model: nn.Module, spec: TrainSpec, runtime, prep, *, context_length: int,
                 sampling: str = "random", batches=None, evaluator=None):
        """``batches`` (a fine-tuning batch source with the BatchSampler interface) replaces the token
        sampler, ``evaluator(trainer) -> {"val_loss", "val_bpb", ...}`` the validation-loss evaluation."""
        self.model = model.train()
        self.raw_model = runtime.unwrap(model)
        self.spec = spec
        self.runtime = runtime
        self.prep = prep
        self.context_length = context_length
        self.BatchSampler = BatchSampler
        self.optimizer = build_optimizer(spec.optimizer, self.raw_model, spec.lr, runtime.device)
        self._kernel_flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.optimizer.param_groups]
        self.total_steps = spec.provisional_steps   # a time budget fixes it after its probe steps
        self.budget_fixed = False
        self.budget_replanned = False  # the time budget's count is final (see loop.TimeBudget)
        self.train_time_s = 0.0       # time spent in optimizer steps, all sessions (time budget)
        self.schedule = build_schedule(spec.schedule, self.total_steps, spec.lr)
        self.local_batch = runtime.local_batch(spec.batch_size)   # train.batch_size is the global batch
        self.sampler = batches if batches is not None else BatchSampler(
            prep.train, self.local_batch, context_length, mode=sampling, seed=spec.seed,
            rank=runtime.rank, world_size=runtime.world_size)
        self.evaluator = evaluator
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.tokens_per_step = spec.tokens_per_step(context_length)
        self.flops_per_token = flops_per_token(self.raw_model, context_length)
        self.check_each_step = spec.nan_policy == "skip" or runtime.sync_is_free
        self._first_bad = torch.full((), -1, dtype=torch.long, device=runtime.device)
        self.step_count = 0           # completed optimizer steps
        self.skipped = 0
        self.best_val_loss = float("inf")
        self.best_step: int | None = None
        self.elapsed_s = 0.0          # wall time of earlier sessions of this run (resume)
        self._has_hook = callable(getattr(self.raw_model, "after_optimizer_step", None))
        runtime.split_rng(spec.seed, 0)   # ranks > 0: own dropout / noise streams after the shared init

    def fix_total_steps(self, total: int) -> None:
        """Set the run's length (time budget): the schedule is rebuilt for it, and checkpoints store it."""
        self.total_steps, self.budget_fixed = total, True
        self.schedule = build_schedule(self.spec.schedule, total, self.spec.lr)

    @property
    def tokens_seen(self) -> int:
        return self.step_count * self.tokens_per_step

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runtime.to_device(batch)

    def step(self) -> StepOutput:
        """One optimizer step over ``grad_accum`` micro-batches."""
        spec, model = self.spec, self.model
        lr = self.schedule(self.step_count)
        set_lr(self.optimizer, lr)
        ce_sum = obj_sum = aux_sum = None
        out = None
        for micro in range(spec.grad_accum):
            x, y = self._to_device(self.sampler.next_batch())
            with self.runtime.grad_sync(model, micro == spec.grad_accum - 1):   # ranks sync on the last
                with self.runtime.autocast():
                    out = model(x, y)
                self.runtime.backward(out.loss / spec.grad_accum)
            ce, obj = out.ce_loss.detach(), out.loss.detach()
            ce_sum = ce if ce_sum is None else ce_sum + ce
            obj_sum = obj if obj_sum is None else obj_sum + obj
            if out.aux_loss is not None:
                aux = out.aux_loss.detach()
                aux_sum = aux if aux_sum is None else aux_sum + aux
        self.runtime.finish_grads(self.raw_model)      # expert-parallel gradients: averaged over all ranks
        grad_norm = None
        if spec.clip is not None:
            grad_norm = self.runtime.clip_grad_norm(self.optimizer, self.params, spec.clip, model=self.raw_model)
        ce_sum, obj_sum, aux_sum = self.runtime.mean_over_ranks(ce_sum, obj_sum, aux_sum)  # all ranks agree
        check = obj_sum if grad_norm is None or self.runtime.scales_loss else obj_sum + grad_norm
        result = StepOutput(loss=ce_sum / spec.grad_accum, lr=lr, grad_norm=grad_norm, stats=out.stats,
                            aux_loss=None if aux_sum is None else aux_sum / spec.grad_accum)
        if self.check_each_step:
            if not bool(torch.isfinite(check)):
                return self._non_finite(result)
        else:  # record the first bad step on the device; check_deferred() raises at the next log step
            bad = ~torch.isfinite(check) & (self._first_bad < 0)
            self._first_bad = torch.where(bad, self.step_count + 1, self._first_bad)
        self.runtime.optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self._has_hook:
            self.raw_model.after_optimizer_step()
        self.step_count += 1
        return result

    def _non_finite(self, result: StepOutput) -> StepOutput:
        step = self.step_count + 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.spec.nan_policy != "skip":
            raise NonFiniteLoss(step)
        self.skipped += 1
        if self.skipped > self.spec.max_skipped_steps:
            raise NonFiniteLoss(step, f" ({self.skipped} steps skipped, more than "
                                      f"train.max_skipped_steps = {self.spec.max_skipped_steps})")
        self.step_count += 1
        result.skipped = True
        return result

    def check_deferred(self) -> None:
        """Raise for a non-finite step recorded on the device since the last check (CUDA, policy stop)."""
        if not self.check_each_step:
            bad = int(self._first_bad)
            if bad >= 0:
                raise NonFiniteLoss(bad)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation cross-entropy over ``eval_steps`` batches (the same batches every time)."""
        if self.evaluator is not None:
            return self.evaluator(self)
        spec = self.spec
        sampler = self.BatchSampler(self.prep.val, self.local_batch, self.context_length, mode="random",
                                    seed=spec.seed, rank=self.runtime.rank, world_size=self.runtime.world_size)
        self.model.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.runtime.device)
        try:
            for _ in range(spec.eval_steps):
                x, y = self._to_device(sampler.next_batch())
                with self.runtime.autocast():
                    total += self.model(x, y).ce_loss.float()
        finally:
            self.model.train()
        (total,) = self.runtime.mean_over_ranks(total)           # every rank's share of the batches
        val_loss = total.item() / spec.eval_steps
        n_tokens, n_bytes = split_size(self.prep, "val")
        bpb = bits_per_byte(val_loss, n_tokens, n_bytes) if n_tokens and n_bytes else None
        return {"val_loss": val_loss, "val_bpb": bpb}

    # ---- state -------------------------------------------------------------------------
    def state_dict(self, optimizer_groups: list[dict] | None = None) -> dict[str, Any]:
        """The whole training state; ``optimizer_groups``: a sharded checkpoint's, whose optimizer tensors are
        written apart (only the param_groups are kept here), instead of the full optimizer state."""
        optimizer = {"sharded": True, "param_groups": optimizer_groups} if optimizer_groups is not None else \
            self.runtime.optimizer_state(self.raw_model, self.optimizer, param_names(self.raw_model, self.optimizer))
        return {"step": self.step_count, "tokens": self.tokens_seen, "skipped": self.skipped,
                "best_val_loss": self.best_val_loss, "best_step": self.best_step, "elapsed_s": self.elapsed_s,
                "optimizer": optimizer,                # full (also FSDP: gathered), or the sharded one's groups
                "optimizer_params": param_names(self.raw_model, self.optimizer),
                "schedule": {"kind": self.spec.schedule.kind, "step": self.step_count},
                "total_steps": self.total_steps, "budget_fixed": self.budget_fixed,
                "budget_replanned": self.budget_replanned, "train_time_s": self.train_time_s,
                "sampler": self.sampler.state_dict(), "rng": rng_state(), "runtime": self.runtime.state_dict()}

    def check_optimizer_params(self, state: dict[str, Any]) -> list[str]:
        """The optimizer's parameter names, refused (StateMismatch) unless they are the saved state's."""
        names = param_names(self.raw_model, self.optimizer)
        if state["optimizer_params"] != names:
            raise StateMismatch("the checkpoint's optimizer state is for other parameters than this model's "
                                f"({len(state['optimizer_params'])} saved, {len(names)} here)")
        return names

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = self.check_optimizer_params(state)
        try:
            if not state["optimizer"].get("sharded"):   # a sharded checkpoint's was read with the weights
                self.runtime.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"], names)
        except (ValueError, KeyError) as e:
            raise StateMismatch(f"cannot restore the optimizer state: {e} "
                                "(was train.optimizer changed since the run started?)") from None
        for group, flags in zip(self.optimizer.param_groups, self._kernel_flags):
            group.update(flags)  # kernels follow this machine, not the saved one
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.runtime.load_state_dict(state.get("runtime") or {})
        self.step_count = int(state["step"])
        self.runtime.split_rng(self.spec.seed, self.step_count)
        self.skipped = int(state["skipped"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = state["best_step"]
        self.elapsed_s = float(state["elapsed_s"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        if state.get("budget_fixed") and self.spec.time_budget:       # the count the budget fixed stays
            self.fix_total_steps(int(state["total_steps"]))
            self.budget_replanned = bool(state.get("budget_replanned", False))


def split_size(prep, split: str) -> tuple[int | None, int | None]:
    """(tokens, bytes) of a split from the prepared data's manifest, None where unknown."""
    manifest = getattr(prep, "manifest", None) or {}
    return (manifest.get("n_tokens", {}).get(split), manifest.get("n_bytes", {}).get(split))


__all__ = ["AdamW", "NonFiniteLoss", "StateMismatch", "StepOutput", "Trainer", "seed_everything"]
