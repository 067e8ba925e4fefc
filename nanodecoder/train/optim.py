"""Optimizers, looked up by ``train.optimizer.kind`` in the ``optimizer`` registry.

A registered optimizer is a class with ``build(params, model, lr, device)``
returning a ``torch.optim.Optimizer``; ``params`` are the blueprint keys besides
``kind`` (validated by ``schemas/train.schema.json``, or by the class's
``PARAMS_SCHEMA`` for a plug-in).

Weight decay (documented decision): parameters with two or more dimensions
(linear weights, 3-D expert tensors, router weights) are decayed; biases, norm
gains and other vectors are not.  Embedding tables (and an output head tied to
them) are decayed by default, as in nanoGPT, so its recipes reproduce; set
``decay_embeddings: false`` for the litgpt/OLMo convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn


def embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of the weights of every ``nn.Embedding`` (a tied head shares one of them)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: decayed (ndim >= 2) and not decayed; each parameter once, in a fixed order."""
    emb = embedding_param_ids(model)
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters already yields a tied tensor once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and (decay_embeddings or id(p) not in emb):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own index order (for checkpoints)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def fused_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel in this torch (``cuda`` only if it cannot tell)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - private helper moved
        return ("cuda",)


@dataclass(frozen=True)
class AdamWConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    implementation: str = "auto"


class AdamW:
    """torch's AdamW with nanoGPT-style parameter groups; the fused kernel where torch has one.

    ``auto`` picks the fused (single-kernel) AdamW on every device type torch
    ships one for (CUDA and the CPU among them) and ``foreach`` elsewhere.  On
    the 2-core CPU the fused step is about 7x faster than ``foreach``
    (2.6 vs 18.3 ms for the 5.7M parameters of moe_gpt.yaml).
    """

    Config = AdamWConfig
    PARAMS_SCHEMA: ClassVar[dict | None] = None  # built-in: schema lives in train.schema.json

    @staticmethod
    def kernel_flags(implementation: str, device: torch.device) -> dict[str, bool]:
        if implementation == "auto":
            implementation = "fused" if device.type in fused_devices() else "foreach"
        return {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False}}[implementation]

    @classmethod
    def build(cls, params: Mapping[str, Any], model: nn.Module, lr: float,
              device: torch.device) -> torch.optim.Optimizer:
        cfg = AdamWConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in params.items()})
        groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps,
                                 **cls.kernel_flags(cfg.implementation, device))


def build_optimizer(choice, model: nn.Module, lr: float, device: torch.device,
                    registry=None) -> torch.optim.Optimizer:
    """Build ``choice`` (a ``Choice``: kind + params) from the optimizer registry."""
    if registry is None:
        from ..registry import registries
        registry = registries()["optimizer"]
    return registry.get(choice.kind).build(dict(choice.params), model, lr, device)
