"""The whole run as frozen, typed specs: one per section, each built by its own module.

``build_run_spec`` is the single step from the validated blueprint dict to
specs; downstream code receives only the part it needs (the model builder the
ModelSpec, the trainer the TrainSpec, ...) and never reads the YAML again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import DataSpec
from ..eval.spec import EvalSpec
from ..finetune.spec import FinetuneSpec
from ..model.spec import ModelSpec, build_model_spec
from ..runtime import RuntimeSpec
from ..train.spec import LoggingSpec, SampleSpec, TrainSpec


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    data: DataSpec | None          # None only for a fine-tuning run without a data section
    train: TrainSpec
    logging: LoggingSpec
    sample: SampleSpec
    runtime: RuntimeSpec
    finetune: FinetuneSpec | None = None
    eval: EvalSpec | None = None


def build_run_spec(raw: dict[str, Any], vocab_size: int | None = None) -> RunSpec:
    """Specs for every section of a validated blueprint.

    ``vocab_size`` is the prepared tokenizer's, used where ``model.vocab_size`` is ``auto``.
    """
    if "data" not in raw and "finetune" not in raw:
        raise ValueError("the blueprint has no data section; a run needs one (see blueprints/dense_gpt.yaml)")
    return RunSpec(model=build_model_spec(raw["model"], vocab_size),
                   data=DataSpec.from_dict(raw["data"]) if "data" in raw else None,
                   train=TrainSpec.from_dict(raw.get("train")),
                   logging=LoggingSpec.from_dict(raw.get("logging")),
                   sample=SampleSpec.from_dict(raw.get("sample")),
                   runtime=RuntimeSpec.from_dict(raw.get("runtime")),
                   finetune=FinetuneSpec.from_dict(raw.get("finetune")),
                   eval=EvalSpec.from_dict(raw.get("eval")))
