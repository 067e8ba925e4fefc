"""The typed, frozen spec of a blueprint's ``eval:`` section (``schemas/eval.schema.json``).

    eval:
      hellaswag: {data: data/hellaswag_val.jsonl, every: 500, limit: 1000}
      text: {data: held_out.txt, every: 500}

Both are optional; ``every: null`` (the default) evaluates whenever the
validation loss is evaluated (``train.eval_every`` and after the last step).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping


def _build(cls, raw: Mapping[str, Any] | None):
    if raw is None:
        return None
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)} (the schema should have caught them)")
    return cls(**dict(raw))


@dataclass(frozen=True)
class HellaSwagEvalSpec:
    data: str
    every: int | None = None
    limit: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class TextEvalSpec:
    data: str
    every: int | None = None
    stride: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class EvalSpec:
    hellaswag: HellaSwagEvalSpec | None = None
    text: TextEvalSpec | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "EvalSpec | None":
        if not raw:
            return None
        raw = dict(raw)
        spec = cls(hellaswag=_build(HellaSwagEvalSpec, raw.pop("hellaswag", None)),
                   text=_build(TextEvalSpec, raw.pop("text", None)))
        if raw:
            raise ValueError(f"EvalSpec: unknown keys {sorted(raw)} (the schema should have caught them)")
        return spec
