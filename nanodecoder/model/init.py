"""Weight initialisation, chosen by the blueprint's ``model.init`` block.

``gpt2``   normal(0, std) for every matrix and embedding, zero biases, and the
           projections that write into the residual stream (tagged with
           ``mark_residual``) scaled by 1/sqrt(2 * n_layers) (GPT-2 paper, 2.3);
           ``zero_init_output: true`` makes those projections zero instead.
``switch`` truncated normal with std sqrt(scale / fan_in), cut at 2 std
           (Switch Transformer, Fedus et al. 2021, 2.3: scale 0.1); routed
           experts use ``expert_scale`` (defaults to ``scale``).
Norm weights are reset to one (their ``reset_parameters``), biases to zero.  A component with special needs
defines ``init_weights(init: InitSpec)``; the walk below calls it instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InitSpec:
    kind: str = "gpt2"                 # "gpt2" | "switch"
    std: float = 0.02                  # gpt2: std of every matrix and embedding
    n_layers: int = 1                  # for the residual scaling
    zero_init_output: bool = False     # gpt2: residual projections start at zero
    scale: float = 0.1                 # switch: variance scale
    expert_scale: float | None = None  # switch: scale for routed experts (None: same as scale)

    @property
    def residual_std(self) -> float:
        return self.std / math.sqrt(2 * self.n_layers)


@torch.no_grad()
def init_tensor(t: torch.Tensor, init: InitSpec, fan_in: int, *, residual: bool = False,
                expert: bool = False, embedding: bool = False) -> None:
    """Initialise one weight tensor in place according to ``init``.

    ``fan_in`` is the input width of the matrix (for a 3-D expert tensor
    ``[E, in, out]`` the ``in`` size).  Embeddings use ``std`` under gpt2 and
    fan_in = 1 (i.e. std sqrt(scale)) would be too large under switch, so
    embeddings keep normal(0, std) in both schemes.
    """
    if init.kind == "gpt2" or embedding:
        if residual and init.zero_init_output and not embedding:
            t.zero_()
        else:
            t.normal_(0.0, init.residual_std if residual else init.std)
    elif init.kind == "switch":
        scale = init.expert_scale if (expert and init.expert_scale is not None) else init.scale
        std = math.sqrt(scale / fan_in)
        nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)
    else:
        raise ValueError(f"unknown init kind '{init.kind}'")


@torch.no_grad()
def init_model(model: nn.Module, init: InitSpec) -> None:
    """Initialise every parameter of ``model`` (call after building on a real device)."""
    handled: set[int] = set()
    for module in model.modules():
        custom = getattr(module, "init_weights", None)
        if custom is not None and module is not model:
            custom(init)
            handled.update(id(p) for p in module.parameters())
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for module in embeddings:  # first, so a tied output head keeps the embedding init
        if id(module.weight) not in handled:
            init_tensor(module.weight, init, module.embedding_dim, embedding=True)
            handled.add(id(module.weight))
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in handled:
            init_tensor(module.weight, init, module.in_features,
                        residual=getattr(module, "is_residual_out", False))
            handled.add(id(module.weight))
            if module.bias is not None:
                module.bias.zero_()
    for module in model.modules():   # norms and anything else that knows its own defaults
        if not isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "reset_parameters") \
                and not any(id(p) in handled for p in module.parameters(recurse=False)):
            module.reset_parameters()
