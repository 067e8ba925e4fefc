"""What every model component has in common.

A component is an ``nn.Module`` registered under a name (its YAML ``kind``).
It owns a frozen ``Spec`` dataclass: ``make_spec(params, ctx)`` turns the
validated YAML parameters plus the model context into that spec, computing
derived values once; ``__init__(spec)`` receives only that spec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ModelContext:
    """Model-wide facts a component may need to derive its spec."""
    d_model: int
    n_layers: int
    context_length: int
    vocab_size: int
    layer: int = -1          # index of the block being built (-1: not in a block)
    head_dim: int = 0        # set for positional encodings that act on heads (RoPE)


class Component(nn.Module):
    """Base class of registered components.

    Subclasses define ``Spec`` (a frozen dataclass) and may override
    ``make_spec``.  Plug-ins also set ``PARAMS_SCHEMA`` (a JSON Schema for
    their YAML parameters, without ``kind``); built-ins keep theirs in
    ``schemas/*.schema.json`` as ``$defs["<category>.<kind>"]``.
    """

    Spec: ClassVar[type]
    PARAMS_SCHEMA: ClassVar[dict | None] = None

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext):
        """Default: YAML params (minus ``kind``) plus ``dim=ctx.d_model`` when the spec has it."""
        fields = {f.name for f in dataclasses.fields(cls.Spec)}
        values = {k: v for k, v in params.items() if k != "kind"}
        if "dim" in fields and "dim" not in values:
            values["dim"] = ctx.d_model
        return cls.Spec(**values)


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Tag a projection that writes into the residual stream (scaled at init)."""
    linear.is_residual_out = True
    return linear


def no_aux() -> dict[str, torch.Tensor]:
    """Dense MLPs return no auxiliary losses or statistics."""
    return {}
