"""The analytic count (from the spec alone) equals the count of the model built on the meta device."""
from __future__ import annotations

import pytest

from nanodecoder.model import build_model_spec
from nanodecoder.model.params import count_blueprint
from nanodecoder.model.plan import param_report

BASE = {"vocab_size": 50, "context_length": 16, "d_model": 32, "n_layers": 3}
ATTN = {"kind": "causal", "n_heads": 4}
CASES = {
    "gpt2-like": {"positional": {"kind": "learned"}, "block": {"norm": {"kind": "layernorm"}, "attention":
                  {**ATTN, "bias": True}, "mlp": {"kind": "gelu", "bias": True}}},
    "untied-gqa-qknorm": {"tie_embeddings": False, "positional": {"kind": "rope"},
                          "block": {"norm": {"kind": "rmsnorm"}, "mlp": {"kind": "swiglu"},
                                    "attention": {**ATTN, "n_kv_heads": 2, "qk_norm": True}}},
    "gemma-like": {"norm_placement": "sandwich", "positional": {"kind": "rope"}, "final_norm": {"kind": "layernorm"},
                   "block": {"norm": {"kind": "rmsnorm"}, "mlp": {"kind": "geglu", "hidden_size": 40},
                             "attention": {**ATTN, "n_kv_heads": 1, "head_dim": 24, "sinks": True,
                                           "qk_norm": True, "qk_norm_scope": "projection", "window": 4}}},
    "moe-every-kind": {"positional": {"kind": "rope"},
                       "block": {"norm": {"kind": "rmsnorm"}, "attention": ATTN, "mlp": {"kind": "relu2"}},
                       "overrides": [
                           {"layers": [0], "mlp": {"kind": "moe", "n_experts": 6, "top_k": 2, "n_shared_experts": 2,
                                                   "expert_kind": "swiglu_clamped", "bias": True,
                                                   "router": {"kind": "noisy_topk", "bias": True}}},
                           {"layers": {"start": 1}, "mlp": {"kind": "moe", "n_experts": 8, "top_k": 3,
                                                            "expert_hidden": 20,
                                                            "router": {"kind": "sigmoid", "n_group": 4,
                                                                       "topk_group": 2}}}]},
    "post-norm": {"norm_placement": "post", "block": {"attention": ATTN, "mlp": {"kind": "geglu"}}},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_analytic_count_equals_the_built_count(name):
    spec = build_model_spec({**BASE, **CASES[name]})
    built = count_blueprint(spec)
    analytic = param_report(spec)
    assert (analytic.total, analytic.active, analytic.embedding) == (built.total, built.active, built.embedding)
    assert built.active < built.total if "moe" in name else built.active == built.total
