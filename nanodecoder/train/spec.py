"""Typed, frozen specs of the ``train``, ``logging`` and ``sample`` blueprint sections.

``from_dict`` receives the section as validated against ``schemas/train.schema.json``
(missing keys take the defaults below; the schema documents the same defaults and a
test keeps the two in agreement).  Derived values are computed once, here.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


def _fields(cls, raw: Mapping[str, Any] | None, nested: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keys of ``raw`` that are fields of ``cls`` (others are a programming error)."""
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)} (the schema should have caught them)")
    raw.update(nested or {})
    return raw


@dataclass(frozen=True)
class Choice:
    """A ``kind`` picked from a registry plus that kind's parameters (treat as read-only)."""
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, default_kind: str) -> "Choice":
        raw = copy.deepcopy(dict(raw or {}))
        kind = raw.pop("kind", default_kind)
        return cls(kind=kind, params=raw)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.params)}


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1000
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    eval_every: int = 250
    eval_steps: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    keep_best: bool = True
    seed: int = 1337
    nan_policy: str = "stop"
    max_skipped_steps: int = 10
    optimizer: Choice = field(default_factory=lambda: Choice("adamw"))
    schedule: Choice = field(default_factory=lambda: Choice("cosine"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "TrainSpec":
        raw = dict(raw or {})
        nested = {"optimizer": Choice.from_dict(raw.pop("optimizer", None), "adamw"),
                  "schedule": Choice.from_dict(raw.pop("schedule", None), "cosine")}
        return cls(**_fields(cls, raw, nested))

    @property
    def clip(self) -> float | None:
        """The gradient-norm clip value, or None when clipping is off."""
        return self.grad_clip if self.grad_clip else None

    def tokens_per_step(self, context_length: int) -> int:
        """Tokens per optimizer step of the whole job (``batch_size`` is the global micro-batch)."""
        return self.batch_size * self.grad_accum * context_length

    def is_eval_step(self, step: int) -> bool:
        """Evaluate after optimizer step ``step`` (1-based)?"""
        return step == self.steps or (self.eval_every > 0 and step % self.eval_every == 0)

    def is_checkpoint_step(self, step: int) -> bool:
        return step == self.steps or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)

    def is_log_step(self, step: int) -> bool:
        return step == 1 or step == self.steps or step % self.log_every == 0


@dataclass(frozen=True)
class WandbSpec:
    mode: str = "disabled"
    project: str = "nanodecoder"
    entity: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "WandbSpec":
        raw = _fields(cls, raw)
        if "tags" in raw:
            raw["tags"] = tuple(raw["tags"])
        return cls(**raw)


@dataclass(frozen=True)
class LoggingSpec:
    runs_dir: str = "runs"
    progress: bool = True
    plots: bool = True
    empty_expert_warn_after: int = 5
    wandb: WandbSpec = field(default_factory=WandbSpec)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "LoggingSpec":
        raw = dict(raw or {})
        return cls(**_fields(cls, raw, {"wandb": WandbSpec.from_dict(raw.pop("wandb", None))}))


@dataclass(frozen=True)
class SampleSpec:
    enabled: bool = True
    prompt: str = "\n"
    max_new_tokens: int = 200
    num_samples: int = 1
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "SampleSpec":
        return cls(**_fields(cls, raw))
