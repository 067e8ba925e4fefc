"""The conformance suite: every registered model kind, built-ins and the plug-ins below, meets its contract.

The kinds come from the catalog, never from a list here: a kind registered tomorrow is checked by the same
tests.  Each kind is built in a tiny model once per entry of its Spec's ``EXAMPLES`` (``components/contracts.py``)
and must:

* run forward and backward, every parameter receiving a finite gradient;
* hold, built on the meta device, exactly the parameters the analytic count gives (rows and totals);
* save for the backward what the plan says, within 3% (per module of the kind, fp32, where the category plans
  per module; for the whole model in fp32 and bf16 otherwise);
* decode with a KV cache exactly as the full forward computes;
* initialise deterministically and survive a checkpoint round trip;
* have a schema entry holding each of its YAML parameters;
* map to a Hugging Face family, or be refused with one line.

A kind with a deliberately wrong contract (a temperature router that does not report the logits it keeps)
fails the saved-bytes check: shown at the end.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nanodecoder.api.blueprint import RunSpec
from nanodecoder.api.catalog import REGISTERS
from nanodecoder.components.contracts import CONTRACTS, FP32
from nanodecoder.components.routers import TopKRouter
from nanodecoder.config.declare import declared, params, yaml_key
from nanodecoder.config.registry import make_catalog
from nanodecoder.config.validate import schema_of
from nanodecoder.hf.convert import hf_family_for
from nanodecoder.hf.families import HFError
from nanodecoder.model import build_model
from nanodecoder.model import plan as P
from nanodecoder.model.block import NORMS
from nanodecoder.model.params import count_params
from nanodecoder.model.spec import build_model_spec
from nanodecoder.train.checkpoint import load_model_weights, model_tensors, save_weights_only
from test_attention_kernels import TemperatureAttention, UnplannedAttention  # noqa: E402  (tests/components)
from test_moe_plugin_experts import GainSoftplusMLP  # noqa: E402
from test_param_roles import DyT  # noqa: E402  (tests/train, on the path by tests/conftest.py)


# ---------------------------------------------------------------------------------------------- test plug-ins
class TemperatureRouter(TopKRouter):
    """Top-k over softmax(logits / t) with one learned temperature t: the division keeps the logits for t's
    gradient, which this Spec reports."""

    @declared
    class Spec(TopKRouter.Spec):
        @property
        def n_params(self):
            return super().n_params + 1

        def saved_bytes_per_token(self):
            return super().saved_bytes_per_token() + self.n_experts * FP32      # the logits, for t's gradient

    def __init__(self, spec):
        super().__init__(spec)
        self.temperature = nn.Parameter(torch.ones((), dtype=torch.float32))

    def initialize(self, init):
        super().initialize(init)
        if hasattr(self, "temperature"):
            self.temperature.fill_(1.0)

    def linear(self, x, weight=None):
        return super().linear(x, weight) / self.temperature


class UnreportedTemperatureRouter(TemperatureRouter):
    """The same router whose Spec forgets the logits it keeps: a wrong contract."""

    @declared
    class Spec(TemperatureRouter.Spec):
        def saved_bytes_per_token(self):
            return TopKRouter.Spec.saved_bytes_per_token(self)


def conformance_catalog():
    catalog = make_catalog(*REGISTERS, plugins=False)
    # names of their own, so that a kind the project or a plug-in adds under a common name never collides
    catalog["norm"].add("conformance_dyt", DyT, origin="plug-in 'conformance'")
    catalog["router"].add("conformance_temperature", TemperatureRouter, origin="plug-in 'conformance'")
    catalog["attention"].add("conformance_temperature", TemperatureAttention, origin="plug-in 'conformance'")
    catalog["mlp"].add("conformance_gain_softplus", GainSoftplusMLP, origin="plug-in 'conformance'")
    return catalog


CATALOG = conformance_catalog()
SCHEMA = schema_of(RunSpec, CATALOG)


# ---------------------------------------------------------------------------------------------- the cases
BASE = {"vocab_size": 50, "context_length": 16, "d_model": 32, "n_layers": 2, "tie_embeddings": False,
        "positional": {"kind": "rope"},
        "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2},
                  "mlp": {"kind": "swiglu"}}}
MOE_HOST = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32}


def model_with(category: str, name: str, example: dict, host: dict) -> dict:
    """A tiny model section whose ``category`` part is the kind ``name`` configured by ``example``."""
    raw = {**BASE, "block": dict(BASE["block"])}
    part = {"kind": name, **example}
    if category == "norm":
        raw["block"]["norm"] = part
    elif category == "positional":
        raw["positional"] = part
    elif category == "rope_scaling":
        raw["positional"] = {"kind": "rope", "scaling": part}
    elif category == "attention":
        raw["block"]["attention"] = part
    elif category == "mlp":
        raw["block"]["mlp"] = part
    elif category == "router":
        raw["block"]["mlp"] = {**MOE_HOST, **host, "router": part}
    elif category == "init":
        raw["init"] = part
    else:                                      # a new category must say here where its kinds go in a model
        raise AssertionError(f"the conformance suite does not know where a {category} kind goes in a model")
    return raw


def cases():
    for category in CONTRACTS:
        registry = CATALOG[category]
        for name in registry.names():
            spec_cls = registry.get(name).Spec
            for i, example in enumerate(spec_cls.EXAMPLES):
                yield pytest.param(category, name, example, spec_cls.HOST, id=f"{category}.{name}[{i}]")


#: beyond each kind's own EXAMPLES: an MoE whose experts are a plug-in MLP kind (one module per expert)
PLUGIN_EXPERTS = {"n_experts": 4, "top_k": 2, "expert_kind": "conformance_gain_softplus", "expert_hidden": 32,
                  "n_shared_experts": 1}
CASES = list(cases()) + [pytest.param("mlp", "moe", PLUGIN_EXPERTS, {}, id="mlp.moe[plug-in experts]")]


def spec_for(category, name, example, host):
    return build_model_spec(model_with(category, name, example, host), catalog=CATALOG)


def tokens(spec, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (B, T), generator=g)


def modules_of(model, category, spec):
    """The modules of the kind under test (every layer's), for the categories planned per module."""
    if category == "norm":
        return [m for m in model.modules() if isinstance(m, spec.block.norm.impl)]
    if category == "attention":
        return [b.attn for b in model.blocks]
    if category == "mlp":
        return [b.mlp for b in model.blocks]
    if category == "router":
        return [b.mlp.router for b in model.blocks]
    return None


def planned_per_module(category, spec, B, T) -> float:
    """What the plan says the kind's modules save (fp32, CPU kernels), summed over the model."""
    c, dev = FP32, "cpu"
    if category == "norm":
        return (spec.n_layers * len(NORMS[spec.norm_placement]) + 1) * B * T * spec.block.norm.saved_bytes_per_token()
    if category == "attention":
        a = spec.block.attention.saved_bytes(T, c, dev, spec.positional.rotates_heads)
        return spec.n_layers * (B * (T * a.per_token + a.per_sequence) + a.per_batch)
    if category == "mlp":
        m = spec.block.mlp
        return spec.n_layers * (B * T * m.saved_bytes_per_token(c, dev) + m.saved_bytes_per_batch(c, dev))
    if category == "router":
        return spec.n_layers * B * T * spec.block.mlp.router.saved_bytes_per_token()
    raise AssertionError(category)


def saved_within(model, idx, modules, dtype=None) -> int:
    """Bytes of the distinct storages autograd saves while one of ``modules`` runs (first saved there),
    parameters and buffers left out; ``modules`` None: the whole training forward."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, torch.Tensor] = {}           # held, so that no storage is freed and its address reused
    inside = [0]
    counted = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = t
            if modules is None or inside[0]:
                counted[0] += t.untyped_storage().nbytes()
        return t

    handles = []
    for m in modules or ():
        handles.append(m.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)))
        handles.append(m.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(idx, idx)
    finally:
        for h in handles:
            h.remove()
    return counted[0]


# ---------------------------------------------------------------------------------------------- the checks
def check_forward_backward(spec):
    torch.manual_seed(0)
    model = build_model(spec, seed=0).train()
    out = model(tokens(spec), tokens(spec, seed=1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def check_meta_count(spec):
    analytic, built = P.param_report(spec), count_params(build_model(spec, device="meta"))
    assert [(r.name, r.count, round(r.active)) for r in analytic.rows] == \
        [(r.name, r.count, round(r.active)) for r in built.rows]
    assert (analytic.total, analytic.active, analytic.embedding) == (built.total, built.active, built.embedding)


def check_saved_bytes(category, spec):
    B, T = 8, 16          # 128 tokens: a CPU bf16 expert loop pads each expert's rows (planned as the average)
    idx = tokens(spec, B, T)
    torch.manual_seed(0)
    model = build_model(spec, seed=0).train()
    modules = modules_of(model, category, spec)
    if modules is not None:
        measured = saved_within(model, idx, modules)
        assert planned_per_module(category, spec, B, T) == pytest.approx(measured, rel=0.03)
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        measured = saved_within(model, idx, None, dtype)
        p = P.plan(spec, P.Setting(context=T, batch=B, precision=precision, device="cpu"))
        assert p.acts.saved + p.memory(False).weight_copies == pytest.approx(measured, rel=0.03), precision


def check_kv_cache(spec):
    model = build_model(spec, seed=0).eval()
    idx = tokens(spec, 2, 12)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_kv_cache(2)
        parts = [model(idx[:, :5], cache=cache).logits]
        parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def check_init_and_round_trip(spec, tmp_path):
    a, b = build_model(spec, seed=3), build_model(spec, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs between two builds with one seed"
        assert torch.isfinite(x).all() if x.is_floating_point() else True, name
    tensors, aliases = model_tensors(a)
    save_weights_only(tmp_path / "ckpt", tensors, aliases, source="conformance")
    c = build_model(spec, seed=4)
    load_model_weights(c, tmp_path / "ckpt")
    idx = tokens(spec)
    with torch.no_grad():
        torch.testing.assert_close(c.eval()(idx).logits, a.eval()(idx).logits, rtol=0, atol=0)


def check_schema_entry(category, name):
    entry = SCHEMA["$defs"][f"{category}.{name}"]
    spec_cls = CATALOG[category].get(name).Spec
    keys = {yaml_key(f) for f, _ in params(spec_cls)}
    assert keys <= set(entry["properties"]), f"missing from the schema: {keys - set(entry['properties'])}"
    assert entry["properties"]["kind"] == {"const": name, "description": "Component kind."}


def check_hf(spec):
    try:
        fam, config = hf_family_for(spec)
    except HFError as e:
        assert "\n" not in str(e) and "closest:" in str(e)
    else:
        assert fam.to_model(config)


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_forward_and_backward(category, name, example, host):
    check_forward_backward(spec_for(category, name, example, host))


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_meta_build_holds_the_analytic_count(category, name, example, host):
    check_meta_count(spec_for(category, name, example, host))


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_planned_saved_bytes_are_what_autograd_saves(category, name, example, host):
    check_saved_bytes(category, spec_for(category, name, example, host))


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_kv_cache_decoding_equals_the_full_forward(category, name, example, host):
    check_kv_cache(spec_for(category, name, example, host))


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_init_and_checkpoint_round_trip(category, name, example, host, tmp_path):
    check_init_and_round_trip(spec_for(category, name, example, host), tmp_path)


@pytest.mark.parametrize("category,name,example,host", CASES)
def test_schema_entry_and_hugging_face_mapping_or_refusal(category, name, example, host):
    check_schema_entry(category, name)
    check_hf(spec_for(category, name, example, host))


#: the model options beside the kinds (the speedrun tricks), each in the tiny model through the same checks
MODEL_OPTIONS = {
    "value_embeddings": {"value_embeddings": {"layers": [1]}},
    "unet_skips": {"n_layers": 4, "unet_skips": {}},
    "mtp": {"mtp": {"depth": 2}},
    "mtp with an moe block": {"mtp": {"depth": 1, "block": {"attention": {"kind": "causal", "n_heads": 4},
                                                            "mlp": MOE_HOST}}},
    "all, GQA": {"n_layers": 4, "block": {"attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2},
                                          "mlp": {"kind": "gelu"}},
                 "value_embeddings": {}, "unet_skips": {"layers": [0]}, "mtp": {}},
}


@pytest.mark.parametrize("option", sorted(MODEL_OPTIONS))
def test_model_options_meet_the_same_checks(option, tmp_path):
    spec = build_model_spec({**BASE, **MODEL_OPTIONS[option]}, catalog=CATALOG)
    check_forward_backward(spec)
    check_meta_count(spec)
    check_saved_bytes("model", spec)
    check_kv_cache(spec)
    check_init_and_round_trip(spec, tmp_path)
    check_hf(spec)


def test_every_category_with_a_contract_has_kinds_and_every_kind_is_exemplified():
    exemplified = {(c, n) for c, n, *_ in (p.values for p in CASES)}
    for category in CONTRACTS:
        assert CATALOG[category].names(), category
        for name in CATALOG[category].names():
            assert (category, name) in exemplified, f"{category} kind {name} has no EXAMPLES"


def test_with_a_capacity_the_plan_is_the_dropless_upper_bound():
    """Which assignments a capacity drops depends on the routing, unknown before training: the plan keeps every
    one (at factor 1.0 on 128 tokens at init, 7.6% more than autograd keeps)."""
    example = {"n_experts": 4, "top_k": 2, "expert_hidden": 32, "capacity_factor": 1.0}
    spec = spec_for("mlp", "moe", example, {})
    B, T = 8, 16
    model = build_model(spec, seed=0).train()
    measured = saved_within(model, tokens(spec, B, T), modules_of(model, "mlp", spec))
    assert measured < planned_per_module("mlp", spec, B, T) < 1.15 * measured


# ---------------------------------------------------------------------------------------------- a wrong contract
def test_an_attention_kind_that_forgets_what_its_transform_keeps_fails_the_suite():
    catalog = make_catalog(*REGISTERS, plugins=False)
    catalog["attention"].add("unplanned", UnplannedAttention, origin="plug-in 'wrong'")
    spec = build_model_spec(model_with("attention", "unplanned", {"n_heads": 4}, {}), catalog=catalog)
    check_forward_backward(spec)
    check_meta_count(spec)
    check_kv_cache(spec)
    with pytest.raises(AssertionError):
        check_saved_bytes("attention", spec)


def test_a_kind_with_a_wrong_contract_fails_the_suite():
    catalog = make_catalog(*REGISTERS, plugins=False)
    catalog["router"].add("unreported", UnreportedTemperatureRouter, origin="plug-in 'wrong'")
    spec = build_model_spec(model_with("router", "unreported", {}, {}), catalog=catalog)
    check_forward_backward(spec)                    # it runs, and counts its weights right...
    check_meta_count(spec)
    with pytest.raises(AssertionError):             # ...but under-plans what it keeps
        check_saved_bytes("router", spec)
    reported = spec.block.mlp.router.saved_bytes_per_token()
    assert TemperatureRouter.Spec.saved_bytes_per_token(spec.block.mlp.router) == reported + 4 * FP32  # E = 4
