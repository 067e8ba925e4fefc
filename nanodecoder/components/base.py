"""What every model component has in common.

A component is an ``nn.Module`` registered under a name (its YAML ``kind``,
see ``components/__init__.py``).  It declares its parameters once, in a nested
``Spec`` (a :func:`~nanodecoder.config.declare.declared` subclass of
:class:`~nanodecoder.config.declare.Kind`): the JSON Schema, the defaults, the
cross-field ``check()`` and the derived sizes (properties) all come from it.
Sizes the component takes from the model (``d_model``, ``n_layers``, ...) are
:func:`~nanodecoder.config.declare.context` fields of the same spec, so
``cls(spec)`` needs nothing else.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config.declare import Kind


class Component(nn.Module):
    """Base class of registered model components: ``__init__(spec)`` with a complete ``Spec``."""

    Spec: ClassVar[type[Kind]]


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Tag a projection that writes into the residual stream (scaled at init)."""
    linear.is_residual_out = True
    return linear


def no_aux() -> dict[str, torch.Tensor]:
    """Dense MLPs return no auxiliary losses or statistics."""
    return {}
