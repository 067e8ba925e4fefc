"""The typed model spec: frozen dataclasses built once from the validated ``model:`` section.

Derived values (head_dim, hidden sizes, the per-layer blocks after overrides,
the vocabulary size from the tokenizer) are computed here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..components.base import ModelContext
from ..registry import registries
from .init import InitSpec


@dataclass(frozen=True)
class ComponentSpec:
    """A chosen component: its registry category, kind, and its own typed spec."""
    category: str
    kind: str
    spec: Any

    def build(self):
        return registries()[self.category].get(self.kind)(self.spec)


@dataclass(frozen=True)
class BlockSpec:
    norm: ComponentSpec
    attention: ComponentSpec
    mlp: ComponentSpec


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    dropout: float
    tie_embeddings: bool
    positional: ComponentSpec
    blocks: tuple[BlockSpec, ...]
    final_norm: ComponentSpec
    init: InitSpec

    @property
    def head_dim(self) -> int:
        return self.blocks[0].attention.spec.head_dim


DEFAULT_NORM = {"kind": "layernorm"}
DEFAULT_POSITIONAL = {"kind": "learned"}


def selected_layers(selector: Any, n_layers: int) -> list[int]:
    """Layer indices named by an override's ``layers`` (a list or {start, stop, every})."""
    if isinstance(selector, list):
        return list(selector)
    start = selector.get("start", 0)
    stop = selector.get("stop")
    return list(range(start, n_layers if stop is None else stop, selector.get("every", 1)))


def layer_blocks(model: dict) -> list[dict]:
    """The raw ``{norm, attention, mlp}`` dict of every layer, overrides applied in order."""
    base = dict(model["block"])
    base.setdefault("norm", DEFAULT_NORM)
    layers = [dict(base) for _ in range(model["n_layers"])]
    for ov in model.get("overrides", []):
        for i in selected_layers(ov["layers"], model["n_layers"]):
            if 0 <= i < len(layers):
                layers[i].update({k: v for k, v in ov.items() if k != "layers"})
    return layers


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return multiple * math.ceil(vocab_size / multiple)


def component(category: str, params: dict, ctx: ModelContext) -> ComponentSpec:
    cls = registries()[category].get(params["kind"])
    return ComponentSpec(category, params["kind"], cls.make_spec(params, ctx))


def build_model_spec(model: dict, vocab_size: int | None = None) -> ModelSpec:
    """Turn a validated ``model:`` dict into a ModelSpec.

    ``vocab_size`` is the tokenizer's; it is used when the blueprint says
    ``vocab_size: auto`` (the default) and must not exceed an explicit value.
    """
    declared = model.get("vocab_size", "auto")
    if declared == "auto":
        if vocab_size is None:
            raise ValueError("model.vocab_size is 'auto' but no tokenizer vocabulary size is known yet")
        vocab = vocab_size
    else:
        vocab = declared
    vocab = padded_vocab(vocab, model.get("pad_vocab_to", 1))
    ctx = ModelContext(d_model=model["d_model"], n_layers=model["n_layers"],
                       context_length=model["context_length"], vocab_size=vocab)
    blocks = []
    for i, raw in enumerate(layer_blocks(model)):
        lctx = ModelContext(**{**ctx.__dict__, "layer": i})
        blocks.append(BlockSpec(norm=component("norm", raw["norm"], lctx),
                                attention=component("attention", raw["attention"], lctx),
                                mlp=component("mlp", raw["mlp"], lctx)))
    head_dim = blocks[0].attention.spec.head_dim
    pctx = ModelContext(**{**ctx.__dict__, "head_dim": head_dim})
    init_raw = model.get("init", {})
    init = InitSpec(kind=init_raw.get("kind", "gpt2"), std=init_raw.get("std", 0.02), n_layers=model["n_layers"],
                    zero_init_output=init_raw.get("zero_init_output", False), scale=init_raw.get("scale", 0.1),
                    expert_scale=init_raw.get("expert_scale"))
    return ModelSpec(
        vocab_size=vocab, context_length=model["context_length"], d_model=model["d_model"],
        n_layers=model["n_layers"], dropout=model.get("dropout", 0.0),
        tie_embeddings=model.get("tie_embeddings", True),
        positional=component("positional", model.get("positional", DEFAULT_POSITIONAL), pctx),
        blocks=tuple(blocks),
        final_norm=component("norm", model.get("final_norm", model["block"].get("norm", DEFAULT_NORM)), ctx),
        init=init)
