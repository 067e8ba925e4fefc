"""Model components: every built-in kind of the model's categories, registered below, one line each.

Adding a kind is one class (its ``Spec`` declares the YAML parameters) and
one line in :func:`register`; the schema, validation and messages follow.
"""
from __future__ import annotations

import functools

from ..config.declare import Kind, build_choice
from ..config.registry import Catalog, make_catalog
from .attention import CausalSelfAttention
from .contracts import CONTRACTS
from .init import GPT2Init, SwitchInit
from .mla import MultiHeadLatentAttention
from .mlp import ClampedSwiGLUMLP, GeGLUMLP, GeluMLP, ReLU2MLP, SwiGLUMLP
from .moe import MoE
from .norms import LayerNorm, RMSNorm
from .positional import LearnedPositional, LinearScaling, Llama3Scaling, NoPositional, RoPE, YarnScaling
from .routers import NoisyTopKRouter, SigmoidRouter, SigmoidTopKRouter, SwitchRouter, TopKRouter


def register(catalog: Catalog) -> None:
    """Add the built-in model kinds to ``catalog``, after setting each category's contract (``contracts.py``),
    which every kind registered later, plug-ins included, must meet."""
    for category, contract in CONTRACTS.items():
        catalog[category].contract = contract
    catalog["norm"].add("layernorm", LayerNorm)
    catalog["norm"].add("rmsnorm", RMSNorm)
    catalog["positional"].add("learned", LearnedPositional)
    catalog["positional"].add("rope", RoPE)
    catalog["positional"].add("none", NoPositional)
    catalog["rope_scaling"].add("linear", LinearScaling)
    catalog["rope_scaling"].add("llama3", Llama3Scaling)
    catalog["rope_scaling"].add("yarn", YarnScaling)
    catalog["attention"].add("causal", CausalSelfAttention)
    catalog["attention"].add("mla", MultiHeadLatentAttention)
    catalog["mlp"].add("gelu", GeluMLP)
    catalog["mlp"].add("swiglu", SwiGLUMLP)
    catalog["mlp"].add("geglu", GeGLUMLP)
    catalog["mlp"].add("swiglu_clamped", ClampedSwiGLUMLP)
    catalog["mlp"].add("relu2", ReLU2MLP)
    catalog["mlp"].add("moe", MoE)
    catalog["router"].add("topk", TopKRouter)
    catalog["router"].add("switch", SwitchRouter)
    catalog["router"].add("sigmoid", SigmoidRouter)
    catalog["router"].add("sigmoid_topk", SigmoidTopKRouter)
    catalog["router"].add("noisy_topk", NoisyTopKRouter)
    catalog["init"].add("gpt2", GPT2Init)
    catalog["init"].add("switch", SwitchInit)


@functools.lru_cache(maxsize=None)
def model_catalog() -> Catalog:
    """The model kinds (built-ins and plug-ins) for building models outside a blueprint run."""
    return make_catalog(register)


def component_spec(category: str, raw: dict, catalog: Catalog | None = None, **context) -> Kind:
    """The complete spec of one component block outside a model, e.g.
    ``component_spec("mlp", {"kind": "moe", "n_experts": 8, "top_k": 2}, d_model=64)``; ``.build()`` makes it."""
    return build_choice(catalog or model_catalog(), category, raw, None, context)
