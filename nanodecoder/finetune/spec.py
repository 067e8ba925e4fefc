"""Typed, frozen specs of the blueprint's ``finetune:`` section (``schemas/finetune.schema.json``).

``finetune.kind`` picks a registered fine-tuning task (category ``finetune``:
``instruction`` or ``classification``); the other keys are that kind's
parameters, turned into the kind's ``Spec``.  The YAML key ``from`` (a Python
keyword) is the field ``source``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}{input}\n\n### Response:\n")
ALPACA_INPUT = "\n\n### Input:\n{input}"
DEFAULT_END_TEXT = "\n\n### End"       # ends each response when the tokenizer has no end-of-text token
BATCHING = ("pad", "pack")


@dataclass(frozen=True)
class TemplateSpec:
    """How a record becomes a prompt: ``{instruction}`` and ``{input}`` are replaced in ``prompt``;
    ``{input}`` there becomes ``input`` (with the record's input in it) or nothing when the input is empty."""
    prompt: str = ALPACA_PROMPT
    input: str = ALPACA_INPUT
    end: str | None = None           # None: the tokenizer's end-of-text token, else DEFAULT_END_TEXT


@dataclass(frozen=True)
class InstructionSpec:
    data: str
    source: str
    kind: str = "instruction"
    from_checkpoint: str = "best"
    val_data: str | None = None
    val_fraction: float = 0.05
    template: TemplateSpec = field(default_factory=TemplateSpec)
    batching: str = "pad"
    loss_on_prompt: bool = False


@dataclass(frozen=True)
class ClassificationSpec:
    data: str
    source: str
    n_classes: int
    kind: str = "classification"
    from_checkpoint: str = "best"
    val_data: str | None = None
    val_fraction: float = 0.1
    text_field: str = "text"
    label_field: str = "label"
    train_last_blocks: int | None = None


def params_from_yaml(raw: Mapping[str, Any]) -> dict[str, Any]:
    """YAML keys -> Spec field names (``from`` -> ``source``, ``template`` -> TemplateSpec)."""
    params = copy.deepcopy(dict(raw))
    if "from" in params:
        params["source"] = params.pop("from")
    if isinstance(params.get("template"), Mapping):
        params["template"] = TemplateSpec(**params["template"])
    return params


def params_to_yaml(spec) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        out["from" if f.name == "source" else f.name] = \
            dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class FinetuneSpec:
    """The chosen task kind and its typed parameters."""
    kind: str
    params: Any

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, registries=None) -> "FinetuneSpec | None":
        if not raw:
            return None
        if registries is None:
            from ..registry import registries as all_registries
            registries = all_registries()
        task = registries["finetune"].get(raw["kind"])
        return cls(kind=raw["kind"], params=task.Spec(**params_from_yaml(raw)))
