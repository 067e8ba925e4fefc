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


#: The optimizer role (``train.optimizer.rules``' ``roles``) of the parameters of a module whose class is
#: registered in one of these categories: any norm kind is a norm, any router kind a router, plug-ins included.
CATEGORY_ROLES = {"norm": "norm", "router": "router"}


class Component(nn.Module):
    """Base class of registered model components: ``__init__(spec)`` with a complete ``Spec``."""

    Spec: ClassVar[type[Kind]]
    #: the optimizer role of this module's own parameters where its category gives none (MoE experts)
    role: ClassVar[str | None] = None


#: torch's own norm layers, which components use inside themselves (a QK-norm is an ``nn.RMSNorm``)
TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def module_role(module: nn.Module) -> str | None:
    """The optimizer role of ``module``'s own parameters: that of the category its spec was chosen from
    (:data:`CATEGORY_ROLES`: any norm kind is a norm, any router kind a router, plug-ins included), else its
    ``role`` (MoE experts: the class's, or set on the modules of an expert built from a plain MLP kind), else
    ``norm`` for torch's own norm layers, else None."""
    category = getattr(getattr(module, "spec", None), "category", None)
    if category in CATEGORY_ROLES:
        return CATEGORY_ROLES[category]
    role = getattr(module, "role", None)
    if role is not None:
        return role
    return "norm" if isinstance(module, TORCH_NORMS) else None


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Tag a projection that writes into the residual stream (scaled at init)."""
    linear.is_residual_out = True
    return linear


def no_aux() -> dict[str, torch.Tensor]:
    """Dense MLPs return no auxiliary losses or statistics."""
    return {}
