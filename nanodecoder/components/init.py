"""Weight initialisation, chosen by the blueprint's ``model.init`` block (category ``init``).

``gpt2``   normal(0, std) for every matrix and embedding, zero biases, and the
           projections that write into the residual stream (tagged with
           ``mark_residual``) scaled by 1/sqrt(2 * n_layers) (GPT-2 paper, 2.3);
           ``zero_init_output: true`` makes those projections zero instead.
``switch`` truncated normal with std sqrt(scale / fan_in), cut at 2 std
           (Switch Transformer, Fedus et al. 2021, 2.3: scale 0.1); routed
           experts use ``expert_scale`` (defaults to ``scale``).
Norm weights are reset to one (their ``reset_parameters``), biases to zero.  A component with special needs
defines ``init_weights(init)``; :func:`init_model` calls it instead.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.declare import context, declared, param
from .contracts import InitKind


class GPT2Init:
    """GPT-2 initialisation: normal(0, std), residual output projections std / sqrt(2 n_layers)."""

    @declared
    class Spec(InitKind):
        std: float = param(0.02, doc="Standard deviation of every matrix and embedding.", exclusive_minimum=0)
        zero_init_output: bool = param(False, doc="Initialise the residual output projections to zero.")
        n_layers: int = context()

        @property
        def residual_std(self) -> float:
            return self.std / math.sqrt(2 * (self.n_layers or 1))

        def fill(self, t: torch.Tensor, fan_in: int, *, residual: bool, expert: bool, embedding: bool) -> None:
            if residual and self.zero_init_output and not embedding:
                t.zero_()
            else:
                t.normal_(0.0, self.residual_std if residual else self.std)


class SwitchInit:
    """Switch Transformer initialisation (Fedus et al. 2021): truncated normal, std sqrt(scale / fan_in), cut at 2 std."""

    @declared
    class Spec(InitKind):
        scale: float = param(0.1, doc="Variance scale.", exclusive_minimum=0)
        expert_scale: float | None = param(None, doc="Scale for routed experts (null: the same as scale).",
                                           exclusive_minimum=0)
        std: float = GPT2Init.Spec.std    # embeddings: normal(0, std), as under gpt2 (not a YAML parameter)

        def fill(self, t: torch.Tensor, fan_in: int, *, residual: bool, expert: bool, embedding: bool) -> None:
            if embedding:                 # fan_in = 1 would give std sqrt(scale): far too large
                t.normal_(0.0, self.std)
                return
            scale = self.expert_scale if (expert and self.expert_scale is not None) else self.scale
            std = math.sqrt(scale / fan_in)
            nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


#: what a component uses when built on its own, outside a model
DEFAULT_INIT = GPT2Init.Spec(kind="gpt2", impl=GPT2Init, n_layers=1)


@torch.no_grad()
def init_tensor(t: torch.Tensor, init, fan_in: int, *, residual: bool = False,
                expert: bool = False, embedding: bool = False) -> None:
    """Initialise one weight tensor in place by the scheme ``init`` (a ``GPT2Init.Spec`` or ``SwitchInit.Spec``).

    ``fan_in`` is the input width of the matrix (for a 3-D expert tensor
    ``[E, in, out]`` the ``in`` size).
    """
    init.fill(t, fan_in, residual=residual, expert=expert, embedding=embedding)


@torch.no_grad()
def init_model(model: nn.Module, init, *, expert: bool = False) -> None:
    """Initialise every parameter of ``model`` (call after building on a real device); ``expert``: its matrices
    are routed MoE experts' (``SwitchInit.expert_scale``)."""
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
                        residual=getattr(module, "is_residual_out", False), expert=expert)
            handled.add(id(module.weight))
            if module.bias is not None:
                module.bias.zero_()
    for module in model.modules():   # norms and anything else that knows its own defaults
        if not isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "reset_parameters") \
                and not any(id(p) in handled for p in module.parameters(recurse=False)):
            module.reset_parameters()
