"""A positional encoding per layer (``overrides[].positional``): Llama 4's NoPE layers, Gemma 3's global layers at
another RoPE theta and scaling.  Each layer rotates with its own positional, each distinct one computed once per
forward; RoPE's head_dim comes from the layer's own attention; the plan and the counts follow the layers."""
from __future__ import annotations

import pytest
import torch

from nanodecoder.components import component_spec, model_catalog
from nanodecoder.components.positional import RoPE
from nanodecoder.config.declare import context_problems
from nanodecoder.config.validate import problems
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.model.block import Rotaries
from nanodecoder.model.params import count_blueprint
from nanodecoder.model.plan import param_report
from nanodecoder.model.spec import ModelSpec

ATTN = {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}                   # head size 8 at d_model 32
GLOBAL = {"kind": "rope", "theta": 1e6, "scaling": {"kind": "linear", "factor": 8.0}}
RAW = {"vocab_size": 64, "context_length": 32, "d_model": 32, "n_layers": 4, "positional": {"kind": "rope"},
       "block": {"norm": {"kind": "rmsnorm"}, "attention": ATTN, "mlp": {"kind": "swiglu"}},
       "overrides": [{"layers": [1], "positional": {"kind": "none"}},                          # NoPE
                     {"layers": [2], "attention": {**ATTN, "head_dim": 16}, "positional": GLOBAL}]}


def found(raw) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in problems(raw, {}, "x.yaml", ModelSpec, model_catalog())]


class _Block:
    def __init__(self, head_dim):
        self.attention = type("A", (), {"rotary_size": head_dim})()


def test_each_layer_gets_its_positional_and_its_attentions_head_dim():
    assert found(RAW) == []
    spec = build_model_spec(RAW)
    kinds = [(b.positional.kind, getattr(b.positional, "head_dim", None), getattr(b.positional, "theta", None))
             for b in spec.blocks]
    assert kinds == [("rope", 8, 1e4), ("none", None, None), ("rope", 16, 1e6), ("rope", 8, 1e4)]
    assert spec.blocks[2].positional.scaling.factor == 8.0
    # the plan sums over the same layers, grouped by their positional too
    assert [(b, n) for b, n in spec.layer_groups] == [(spec.blocks[0], 2), (spec.blocks[1], 1), (spec.blocks[2], 1)]
    assert context_problems(ModelSpec, model_catalog()) == []


def test_each_block_rotates_with_its_own_rotary_computed_once_per_forward(monkeypatch):
    model = build_model(build_model_spec(RAW), seed=0).eval()
    assert [b.rotary_index for b in model.blocks] == [0, 1, 2, 0]
    calls = []
    original = RoPE.rotary
    monkeypatch.setattr(RoPE, "rotary", lambda self, pos: calls.append(self) or original(self, pos))
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.hidden(idx)[0]
    assert len(calls) == 2 and len(set(map(id, calls))) == 2      # two RoPEs for three rotating layers
    # the same layers by hand: layer 1 unrotated, layer 2 with its own RoPE at theta 1e6, positions / 8
    pos = torch.arange(9)
    local = component_spec("positional", {"kind": "rope"}, block=_Block(8)).build().rotary(pos)
    far = component_spec("positional", GLOBAL, block=_Block(16)).build()
    torch.testing.assert_close(far.inv_freq, 1.0 / 1e6 ** (torch.arange(0, 16, 2).double() / 16).float() / 8)
    x = model.wte(idx)
    with torch.no_grad():
        for block, rotary in zip(model.blocks, (local, None, far.rotary(pos), local)):
            x = block(x, rotary)[0]
        torch.testing.assert_close(got, model.norm(x), rtol=0, atol=1e-6)
        nope, h = model.blocks[1], torch.randn(1, 5, 32)           # takes its own (None) of the decoder's three
        torch.testing.assert_close(nope(h, Rotaries([local, None, local]))[0], nope(h, None)[0])


def test_kv_cache_decoding_equals_the_full_forward():
    model = build_model(build_model_spec(RAW), seed=0).eval()
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_kv_cache(2, 16)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache).logits for t in range(10)], dim=1)
    assert (steps - full).abs().max().item() <= 1e-5


def test_counts_of_the_meta_build_and_the_plan_agree():
    spec = build_model_spec(RAW)
    built, analytic = count_blueprint(spec), param_report(spec)
    assert [(r.name, r.count) for r in built.rows] == [(r.name, r.count) for r in analytic.rows]
    assert built.total == analytic.total == sum(p.numel() for p in build_model(spec, device="meta").parameters())
    assert "wte.weight" in build_model(spec).state_dict() and not any(
        k.startswith("layer_positionals") for k in build_model(spec).state_dict())   # RoPE keeps no weights


def test_learned_positions_only_for_the_whole_model():
    raw = {**RAW, "overrides": [{"layers": [1], "positional": {"kind": "learned"}}]}
    (path, message), = found(raw)
    assert path == "overrides[0].positional"
    assert "only model.positional may be learned" in message and "\n" not in message
    # learned for the whole model, RoPE in some layers: fine
    assert found({**RAW, "positional": {"kind": "learned"}}) == []


def test_rope_checks_apply_per_positional():
    wide = {**ATTN, "head_dim": 16}
    # layers of one RoPE with two head sizes: refused, naming that positional
    raw = {**RAW, "overrides": [{"layers": [1, 2], "positional": GLOBAL}, {"layers": [2], "attention": wide}]}
    (path, message), = found(raw)
    assert path == "overrides[1].attention.n_heads"
    assert message == ("with RoPE every layer of model.overrides[0].positional needs the same head dimension; this "
                       "block gives 16, model.block.attention gives 8")
    # a layer of another head size with a RoPE of its own is fine (RAW), and so is an odd head size without RoPE
    odd = {**ATTN, "n_heads": 32, "n_kv_heads": None}
    assert found({**RAW, "overrides": [{"layers": [1], "attention": odd, "positional": {"kind": "none"}}]}) == []
    (path, message), = found({**RAW, "overrides": [{"layers": [1], "attention": odd}]})
    assert path == "overrides[0].attention.n_heads" and message.startswith("RoPE needs an even head dimension")
