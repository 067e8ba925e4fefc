"""Build a model from its spec, on a real device (initialised) or on ``meta`` (no memory)."""
from __future__ import annotations

import torch
from torch import nn

from .decoder import Decoder
from ..components.init import init_model
from .spec import ModelSpec


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers (FSDP2's is its own)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_name(name: str) -> str:
    """A parameter name without torch.compile (``_orig_mod.``) and DDP (``module.``) prefixes, wherever they occur:
    the name :func:`unwrap`'s module gives it."""
    return ".".join(p for p in name.split(".") if p not in ("_orig_mod", "module"))


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", *, seed: int | None = None) -> Decoder:
    """Construct the decoder directly on ``device`` and initialise it (skipped on meta)."""
    device = torch.device(device)
    with torch.device(device):
        model = Decoder(spec)
    if device.type != "meta":
        if seed is not None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                init_model(model, spec.init)
        else:
            init_model(model, spec.init)
    return model


def materialize(model: Decoder, device: str | torch.device) -> Decoder:
    """Move a meta-built model onto ``device`` and initialise it."""
    model = model.to_empty(device=device)
    if model.spec.tie_embeddings:
        model.head.weight = model.wte.weight
    init_model(model, model.spec.init)
    return model
