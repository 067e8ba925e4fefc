"""Every built-in component, registered in this one place.

The YAML ``kind`` names on the left are the names in ``schemas/``; a test
checks that the two agree exactly.  Plug-ins add theirs through the
``nanodecoder.components`` entry point group (see ``registry.load_plugins``).
"""
from __future__ import annotations

from .components.attention import CausalSelfAttention
from .components.mlp import GeluMLP, ReLU2MLP, SwiGLUMLP
from .components.norms import LayerNorm, RMSNorm
from .components.positional import LearnedPositional, RoPE


def register_all(regs) -> None:
    regs["norm"].add("layernorm", LayerNorm)
    regs["norm"].add("rmsnorm", RMSNorm)
    regs["positional"].add("learned", LearnedPositional)
    regs["positional"].add("rope", RoPE)
    regs["attention"].add("causal", CausalSelfAttention)
    regs["mlp"].add("gelu", GeluMLP)
    regs["mlp"].add("swiglu", SwiGLUMLP)
    regs["mlp"].add("relu2", ReLU2MLP)
    from . import data, finetune, train
    from .components import moe
    for module in (moe, data, train, finetune):  # MoE, data, training and fine-tuning kinds register themselves
        module.register(regs)
