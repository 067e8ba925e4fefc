"""Any registered MLP kind, a plug-in included, is an MoE expert kind: schema, refusals, build, training, count,
plan and optimizer roles.

The plug-in below has its own forward (no 3-D layout), so its experts are one module each
(``moe_experts.ExpertModules``); the built-in dense kinds keep their 3-D experts (tests/components/test_moe*.py,
tests/test_old_checkpoints.py).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanodecoder.api.blueprint import RunSpec
from nanodecoder.api.catalog import REGISTERS
from nanodecoder.components import component_spec
from nanodecoder.components.base import Component, mark_residual
from nanodecoder.components.contracts import MLPKind
from nanodecoder.components.init import SwitchInit
from nanodecoder.components.moe_experts import ExpertModules, Experts
from nanodecoder.config.declare import context, declared, param
from nanodecoder.config.registry import make_catalog
from nanodecoder.config.validate import problems, schema_of
from nanodecoder.model import build_model
from nanodecoder.model import plan as P
from nanodecoder.model.params import count_params
from nanodecoder.model.spec import build_model_spec
from nanodecoder.train.optim import build_optimizer, param_roles


class GainSoftplusMLP(Component):
    """down(softplus(gain * up(x))) with a learned gain per hidden unit: an MLP kind with its own forward."""

    @declared
    class Spec(MLPKind):
        hidden_size: int = param(24, doc="Hidden width.", minimum=1)
        bias: bool = param(False, doc="Biases on the two projections.")
        dim: int = context("d_model")

        @property
        def n_params(self):
            H, D = self.hidden_size, self.dim
            return 2 * D * H + H + (H + D if self.bias else 0)

        def saved_bytes_per_token(self, c, device):
            """Its input, the up-projection's output, the gained one (softplus's input) and softplus's output."""
            return self.dim * c + 3 * self.hidden_size * c

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.up = nn.Linear(spec.dim, spec.hidden_size, bias=spec.bias)
        self.gain = nn.Parameter(torch.ones(spec.hidden_size))
        self.down = mark_residual(nn.Linear(spec.hidden_size, spec.dim, bias=spec.bias))

    def reset_parameters(self):
        nn.init.ones_(self.gain)

    def forward(self, x):
        h = self.up(x)
        return self.down(F.softplus(h * self.gain.to(h.dtype))), {}


class FixedWidthMLP(GainSoftplusMLP):
    """The same MLP of a fixed width 20, which declares no hidden_size and no bias."""

    @declared
    class Spec(MLPKind):
        dim: int = context("d_model")
        hidden_size = 20
        bias = False
        n_params = GainSoftplusMLP.Spec.n_params
        saved_bytes_per_token = GainSoftplusMLP.Spec.saved_bytes_per_token


class NeedsScaleMLP(GainSoftplusMLP):
    """The same MLP with a required parameter, which an MoE cannot hand its experts."""

    @declared
    class Spec(GainSoftplusMLP.Spec):
        scale: float = param(doc="A required scale.")


def plugin_catalog():
    catalog = make_catalog(*REGISTERS, plugins=False)
    catalog["mlp"].add("gain_softplus", GainSoftplusMLP, origin="plug-in 'test'")
    catalog["mlp"].add("fixed_width", FixedWidthMLP, origin="plug-in 'test'")
    catalog["mlp"].add("needs_scale", NeedsScaleMLP, origin="plug-in 'test'")
    return catalog


CATALOG = plugin_catalog()
MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_kind": "gain_softplus", "expert_hidden": 16,
       "n_shared_experts": 1}
MODEL = {"vocab_size": 40, "context_length": 16, "d_model": 16, "n_layers": 2, "tie_embeddings": False,
         "positional": {"kind": "rope"},
         "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 2}, "mlp": MOE}}


def model_spec(**mlp):
    return build_model_spec({**MODEL, "block": {**MODEL["block"], "mlp": {**MOE, **mlp}}}, catalog=CATALOG)


def mlp_problems(**mlp) -> list[str]:
    raw = {"model": {**MODEL, "block": {**MODEL["block"], "mlp": {**MOE, **mlp}}}}
    return [f"{p.path}: {p.message}" for p in problems(raw, {}, "bp.yaml", RunSpec, CATALOG)]


def tokens(B=3, T=16, seed=0):
    return torch.randint(0, MODEL["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def saved_bytes(model, idx, dtype=None) -> int:
    """Bytes of the distinct storages autograd saves in a training forward (parameters and buffers left out)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        model(idx, idx)
    return sum(seen.values())


# ------------------------------------------------------------------------------------------- schema, refusals
def test_the_schema_offers_every_registered_mlp_kind_but_an_moe():
    def offered(catalog):
        return schema_of(RunSpec, catalog)["$defs"]["mlp.moe"]["properties"]["expert_kind"]["enum"]
    assert offered(CATALOG) == sorted(n for n in CATALOG["mlp"].names() if n != "moe")
    assert "gain_softplus" in offered(CATALOG)
    assert offered(make_catalog(*REGISTERS, plugins=False)) == ["geglu", "gelu", "relu2", "swiglu", "swiglu_clamped"]


@pytest.mark.parametrize("mlp,message", [
    ({"expert_kind": "gain_softplux"}, r"^model.block.mlp.expert_kind: unknown value 'gain_softplux'; did you mean "
                                       r"'gain_softplus'\? \(expected one of: fixed_width, gain_softplus, geglu, "),
    ({"expert_kind": "moe"}, r"^model.block.mlp.expert_kind: unknown value 'moe' \(expected one of: .*swiglu"),
    ({"expert_kind": "fixed_width"}, r"^model.block.mlp.expert_hidden: expert_kind 'fixed_width' declares no "
                                     r"hidden_size, so expert_hidden cannot size its experts; remove expert_hidden"),
    ({"expert_kind": "fixed_width", "expert_hidden": None, "expert_hidden_mult": 2.0},
     r"^model.block.mlp.expert_hidden_mult: expert_kind 'fixed_width' declares no hidden_size"),
    ({"expert_kind": "fixed_width", "expert_hidden": None, "bias": True},
     r"^model.block.mlp.bias: expert_kind 'fixed_width' declares no bias, so its experts cannot take bias: true"),
    ({"expert_kind": "needs_scale"}, r"^model.block.mlp.expert_kind: expert_kind 'needs_scale' requires 'scale', "
                                     r"which an MoE cannot give its experts"),
    ({"dispatch": "grouped_mm"}, r"^model.block.mlp.dispatch: grouped_mm runs experts stored as 3-D tensors .*"
                                 r"expert_kind 'gain_softplus' runs one module per expert"),
])
def test_an_expert_kind_that_cannot_be_built_is_one_line(mlp, message):
    got = mlp_problems(**mlp)
    assert len(got) == 1 and re.search(message, got[0]), got


def test_valid_plugin_experts_pass_validation():
    assert mlp_problems() == []
    assert mlp_problems(expert_kind="fixed_width", expert_hidden=None) == []
    assert mlp_problems(bias=True, expert_hidden=None, expert_hidden_mult=1.5) == []


# ------------------------------------------------------------------------------------------- build, count, train
def test_plugin_experts_are_modules_of_the_kind_sized_by_the_moe():
    spec = model_spec()
    moe = build_model(spec).blocks[0].mlp
    assert isinstance(moe.experts, ExpertModules) and isinstance(moe.shared, ExpertModules)
    assert len(moe.experts) == 4 and len(moe.shared) == 1
    assert all(isinstance(m, GainSoftplusMLP) and m.spec.hidden_size == 16 for m in [*moe.experts, *moe.shared])
    assert "blocks.0.mlp.experts.3.up.weight" in build_model(spec).state_dict()
    # the kind's own width where the MoE hands none down; the mult rounded up to 16 as for the built-ins
    assert build_model(model_spec(expert_kind="fixed_width", expert_hidden=None)).blocks[0].mlp.experts[0].up \
        .out_features == 20
    assert model_spec(expert_hidden=None, expert_hidden_mult=1.5).block.mlp.expert.hidden_size == 32
    assert model_spec(expert_hidden=None).block.mlp.expert.hidden_size == 24
    # a built-in dense kind keeps its 3-D experts
    assert isinstance(build_model(model_spec(expert_kind="swiglu")).blocks[0].mlp.experts, Experts)


@pytest.mark.parametrize("mlp", [{}, {"bias": True, "n_shared_experts": 2}])
def test_meta_build_holds_the_analytic_count(mlp):
    spec = model_spec(**mlp)
    analytic, built = P.param_report(spec), count_params(build_model(spec, device="meta"))
    assert (analytic.total, analytic.active) == (built.total, built.active)
    H, D, E = 16, 16, 4
    per_expert = 2 * D * H + H + (H + D if mlp.get("bias") else 0)
    m = spec.block.mlp
    assert m.n_params == m.router.n_params + (E + m.n_shared_experts) * per_expert
    assert m.n_active == m.router.n_params + (2 + m.n_shared_experts) * per_expert


def test_the_expert_role_reaches_every_plugin_expert_parameter_and_it_trains():
    spec = model_spec()
    torch.manual_seed(0)
    model = build_model(spec).train()
    roles = param_roles(model)
    experts = {n for n, p in model.named_parameters() if "expert" in roles[id(p)]}
    assert experts == {n for n, _ in model.named_parameters() if ".mlp.experts." in n or ".mlp.shared." in n}
    assert "blocks.1.mlp.shared.0.gain" in experts and "blocks.0.mlp.router.weight" not in experts
    opt_spec = component_spec("optimizer", {"kind": "adamw", "rules": [{"roles": ["expert"], "lr": 0.03}]},
                              catalog=CATALOG, model=spec)
    opt = build_optimizer(opt_spec, model, 0.01, torch.device("cpu"))
    at_rule_lr = {id(p) for g in opt.param_groups if g["lr"] == 0.03 for p in g["params"]}   # matrices, vectors
    assert at_rule_lr == {id(p) for n, p in model.named_parameters() if n in experts}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = tokens()
    losses = []
    for _ in range(6):
        out = model(idx, idx)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in experts)


def test_switch_init_gives_routed_plugin_experts_the_expert_scale():
    spec = model_spec()
    model = build_model(spec)
    moe = model.blocks[0].mlp
    init = SwitchInit.Spec(kind="switch", impl=SwitchInit, scale=1.0, expert_scale=1e-4)
    with torch.no_grad():
        moe.experts[0].gain.fill_(3.0)
    torch.manual_seed(0)
    moe.init_weights(init)
    routed, shared = moe.experts[0].up.weight, moe.shared[0].up.weight
    assert routed.std().item() == pytest.approx((1e-4 / 16) ** 0.5, rel=0.2)      # expert_scale, fan_in d_model
    assert shared.std().item() == pytest.approx((1.0 / 16) ** 0.5, rel=0.2)       # shared experts: scale
    assert torch.equal(moe.experts[0].gain, torch.ones(16))                       # its own reset_parameters
    again = build_model(spec).blocks[0].mlp
    torch.manual_seed(0)
    again.init_weights(init)
    assert torch.equal(again.experts[2].down.weight, moe.experts[2].down.weight)


# ------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("mlp", [{}, {"n_shared_experts": 0}, {"bias": True, "n_shared_experts": 2}],
                         ids=["shared", "routed only", "bias, two shared"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planned_saved_bytes_are_what_autograd_saves(mlp, precision):
    spec = model_spec(**mlp)
    torch.manual_seed(0)
    model = build_model(spec).train()
    B, T = 3, 16
    measured = saved_bytes(model, tokens(B, T), torch.bfloat16 if precision == "bf16" else None)
    p = P.plan(spec, P.Setting(context=T, batch=B, precision=precision, device="cpu"))
    assert p.acts.saved + p.memory(False).weight_copies == pytest.approx(measured, rel=0.03)


def test_the_plan_asks_the_expert_kinds_contract():
    """Routed: k x (what the expert saves per token + the MoE's own per assignment); shared: what each saves."""
    m = model_spec().block.mlp
    wider = model_spec(expert_hidden=32).block.mlp
    per_token = {c: wider.saved_bytes_per_token(c, "cpu") - m.saved_bytes_per_token(c, "cpu") for c in (4, 2)}
    # 16 more hidden units: 3 saved numbers each per expert run (2 routed + 1 shared per token)
    assert per_token == {4: 3 * 3 * 16 * 4, 2: 3 * 3 * 16 * 2}
