"""MoE layer: capacity and drop order, aux statistics, causality, empty experts, init, spec, registration."""
from __future__ import annotations

import math
import re

import pytest
import torch

from nanodecoder.cli.blueprint import RunSpec
from nanodecoder.cli.catalog import catalog
from nanodecoder.components import component_spec, register
from nanodecoder.components.init import GPT2Init, SwitchInit
from nanodecoder.components.moe import MoE
from nanodecoder.components.moe_dispatch import expert_capacity, plan_dispatch
from nanodecoder.components.routers import NoisyTopKRouter, SigmoidRouter, SwitchRouter, TopKRouter, load_balancing_loss
from nanodecoder.config.declare import build
from nanodecoder.config.registry import new_catalog
from nanodecoder.config.validate import problems

D_MODEL = 8


def make(d_model=D_MODEL, **params) -> MoE:
    p = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 12, **params}
    torch.manual_seed(0)
    return component_spec("mlp", p, d_model=d_model).build()


def moe_problems(d_model=D_MODEL, **params) -> list[str]:
    """The validation messages of a small blueprint whose block MLP is this MoE."""
    mlp = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 12, **params}
    raw = {"model": {"vocab_size": 32, "context_length": 16, "d_model": d_model, "n_layers": 3,
                     "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": mlp}}}
    return [f"{p.path}: {p.message}" for p in problems(raw, {}, "bp.yaml", RunSpec, catalog())]


# ----------------------------------------------------------------- capacity
def test_capacity_formula_train_and_eval():
    moe = make(n_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    moe.train()
    assert moe.capacity(6) == 4            # ceil(1.875) = 2 -> min_capacity 4
    assert moe.capacity(40) == 13          # ceil(12.5) = 13: odd, NOT rounded to even
    assert moe.capacity(64) == 20
    moe.eval()
    assert moe.capacity(64) == 32          # ceil(2.0 * 64 * 2 / 8)
    assert moe.capacity(5) == 4            # ceil(2.5) = 3 -> min_capacity 4
    assert make(capacity_factor=1.5).eval().capacity(16) == 12         # eval factor defaults to train's
    assert make(capacity_factor=1.5, eval_capacity_factor=None).eval().capacity(16) is None
    assert make().capacity(16) is None                                   # dropless by default
    assert expert_capacity(0.5, 10, 3, 7, 0) == math.ceil(0.5 * 10 * 3 / 7)


def test_dropped_fraction_and_zero_output_of_dropped_tokens():
    moe = make(top_k=1, capacity_factor=0.5, min_capacity=0, router={"kind": "topk"}).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0          # every token (positive inputs) picks expert 2
    x = torch.rand(2, 8, 8) + 0.1
    y, aux = moe(x)
    cap = math.ceil(0.5 * 16 * 1 / 4)       # 2 slots
    assert aux["dropped_frac"].item() == pytest.approx((16 - cap) / 16)
    flat = y.reshape(16, 8)
    assert (flat[:cap].abs().sum(-1) > 0).all()       # earliest tokens kept
    assert torch.equal(flat[cap:], torch.zeros(16 - cap, 8))
    assert aux["load"].tolist() == [0.0, 0.0, 1.0, 0.0]   # load is counted before dropping


def test_dropped_count_random_routing():
    moe = make(capacity_factor=0.7, min_capacity=0).train()
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(5))
    r = moe.router(x.reshape(-1, 8))
    routed = torch.bincount(r.indices.reshape(-1), minlength=4)
    cap = moe.capacity(21)
    expected = (routed - cap).clamp(min=0).sum().item() / r.indices.numel()
    assert expected > 0
    assert moe(x)[1]["dropped_frac"].item() == pytest.approx(expected)


def test_priority_and_position_drop_order():
    # tokens 0-2 choose (1, 0), tokens 3-5 choose (0, 1); capacity 3 per expert.
    idx = torch.tensor([[1, 0]] * 3 + [[0, 1]] * 3)
    kept = lambda plan: sorted((int(s) % 6, int(s) // 6) for s in plan.slot)  # noqa: E731  (token, rank)
    prio = plan_dispatch(idx, 3, capacity=3, policy="priority")
    assert kept(prio) == [(t, 0) for t in range(6)]          # exactly the second choices dropped
    assert prio.counts.tolist() == [3, 3, 0] and prio.n_dropped.item() == 6
    pos = plan_dispatch(idx, 3, capacity=3, policy="position")
    kept_pos = sorted((int(s) // 2, int(s) % 2) for s in pos.slot)
    assert kept_pos == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]   # earlier tokens first
    ranked = plan_dispatch(torch.tensor([[0, 1], [0, 1], [1, 0]]), 2, capacity=2)
    # expert 0: the firsts of tokens 0, 1 beat token 2's second; expert 1: token 2's first,
    # then among the seconds the earlier token 0 beats token 1.
    assert ranked.token.tolist() == [0, 1, 2, 0]


def _steered(policy="priority") -> tuple[MoE, torch.Tensor]:
    """Tokens 0-2 route (1, 0), tokens 3-5 route (0, 1); expert 2 gets nothing."""
    moe = make(n_experts=3, capacity_factor=0.75, min_capacity=0, drop_policy=policy, bias=True,
               router={"kind": "topk", "renormalize": False}, d_model=4).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[2.0, 3, 0, 0], [3, 2, 0, 0], [0, 0, 5, 0]]))
    x = torch.zeros(1, 6, 4)
    x[0, :3, 0] = 1.0
    x[0, 3:, 1] = 1.0
    return moe, x


def test_priority_drop_keeps_first_choices_in_the_layer():
    moe, x = _steered()
    y, aux = moe(x)
    assert aux["dropped_frac"].item() == 0.5
    r = moe.router(x[0])
    ex = moe.experts
    for t in range(6):
        e = int(r.indices[t, 0])
        h = x[0, t] @ ex.up[e] + ex.up_bias[e]
        want = r.weights[t, 0] * (ex.act(h) @ ex.down[e] + ex.down_bias[e])
        torch.testing.assert_close(y[0, t], want)


def test_capacity_makes_training_non_causal_but_dropless_eval_is_causal():
    moe, x = _steered()
    y, _ = moe(x)
    x2 = x.clone()
    x2[0, 3:] = torch.tensor([0.0, 0.0, 1.0, 0.0])   # later tokens now route (2, 0): expert 0 frees up
    y2, _ = moe(x2)
    assert not torch.allclose(y[0, :3], y2[0, :3], rtol=1e-3, atol=0)   # documented: later tokens changed them

    moe = make(capacity_factor=0.5, eval_capacity_factor=None, n_shared_experts=1).eval()
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(6))
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0][:, :6], moe(x2)[0][:, :6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
@pytest.mark.parametrize("empty", [1, 2])
def test_empty_expert_still_gets_zero_gradients(dispatch, empty):
    _, x = _steered()
    moe = make(n_experts=3, dispatch=dispatch, bias=True, n_shared_experts=1, d_model=4,
               router={"kind": "topk"}).train()
    rows = [[2.0, 3, 0, 0], [3, 2, 0, 0]]
    rows.insert(empty, [0, 0, 0, 0])
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor(rows))
    y, aux = moe(x)
    assert aux["load"][empty].item() == 0.0
    y.sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    busy = [e for e in range(3) if e != empty]
    for p in (moe.experts.up, moe.experts.down, moe.experts.up_bias, moe.experts.down_bias):
        assert torch.equal(p.grad[empty], torch.zeros_like(p.grad[empty]))
        assert p.grad[busy].abs().sum() > 0


# ----------------------------------------------------------------- aux
def test_lb_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.4875 + 0.0875)
    assert load_balancing_loss(probs, idx, 2).item() == pytest.approx(1.15)
    # per sequence: (1, 0)x(.85, .15) -> 1.7 ; (.5, .5)x(.45, .55) -> 1.0 ; mean 1.35
    assert load_balancing_loss(probs, idx, 2, n_groups=2).item() == pytest.approx(1.35)
    idx2 = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])   # k = 2: f counts all choices
    assert load_balancing_loss(probs, idx2, 2).item() == pytest.approx(2 * (0.5 * 0.65 + 0.5 * 0.35))


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "sigmoid"])
@pytest.mark.parametrize("lb_type", ["batch", "sequence"])
def test_lb_loss_is_one_for_uniform_router(kind, lb_type):
    moe = make(router={"kind": kind}, lb_loss_coef=0.02, z_loss_coef=0.0, lb_loss_type=lb_type).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(torch.randn(2, 6, 8))
    assert aux["lb_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert aux["loss"].item() == pytest.approx(0.02, abs=1e-8)
    assert aux["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert aux["router_entropy"].item() == pytest.approx(math.log(4), rel=1e-6)


def test_aux_contract():
    moe = make(capacity_factor=1.0).train()
    y, aux = moe(torch.randn(2, 5, 8))
    assert set(aux) == {"loss", "lb_loss", "z_loss", "load", "dropped_frac", "router_entropy"}
    assert aux["loss"].requires_grad and aux["loss"].dim() == 0
    assert all(not v.requires_grad for k, v in aux.items() if k != "loss")
    assert aux["load"].shape == (4,) and aux["load"].sum().item() == pytest.approx(1.0)
    assert aux["load"].dtype == torch.float32 and y.shape == (2, 5, 8)


# ----------------------------------------------------------------- precision / paths
def test_grouped_mm_and_loop_agree_in_bf16_and_router_stays_fp32_under_autocast():
    a, b = make(dispatch="grouped_mm"), make(dispatch="loop")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, _ = a(x)
        yb, _ = b(x)
        r = a.router(x.reshape(-1, 8))
    assert r.logits.dtype == torch.float32
    assert torch.equal(r.indices, a.router(x.reshape(-1, 8)).indices)
    assert a.experts.use_grouped_mm(x.reshape(-1, 8))
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
    a.bfloat16()
    y, aux = a(x.bfloat16())
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and a.experts.up.grad is not None


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_bf16_experts_pad_their_rows_and_the_padding_changes_nothing(bias):
    """Under CPU bf16 autocast auto dispatch takes the loop with each expert's rows padded to a multiple of
    CPU_LOW_PRECISION_ROWS (oneDNN builds a kernel per matmul shape); outputs and gradients equal the same bf16
    matmuls on the exact rows."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from nanodecoder.components.moe_experts import CPU_LOW_PRECISION_ROWS as ROWS

    class MatmulRows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default and args[0].dtype == torch.bfloat16:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    ex = make(n_experts=4, expert_hidden=16, bias=bias).experts
    if bias:
        with torch.no_grad():
            ex.up_bias.normal_(), ex.down_bias.normal_()
    counts = torch.tensor([40, 0, 3, 64])
    xs = torch.randn(int(counts.sum()), D_MODEL, generator=torch.Generator().manual_seed(3))
    g = torch.randn(xs.shape[0], D_MODEL, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ex.use_grouped_mm(xs)
        with MatmulRows() as mode:
            y = ex.forward_sorted(xs, counts)
        assert set(mode.rows) == {64, 0, 32} and all(r % ROWS == 0 for r in mode.rows)
        got = torch.autograd.grad(y, list(ex.parameters()), g)
        want_y = []
        for e, c in enumerate(xs.split(counts.tolist())):       # each expert on its own rows only
            h = c @ ex.up[e] + (ex.up_bias[e].bfloat16() if bias else 0)
            want_y.append(ex.act(h) @ ex.down[e] + (ex.down_bias[e].bfloat16() if bias else 0))
        want_y = torch.cat(want_y)
        want = torch.autograd.grad(want_y, list(ex.parameters()), g)
    assert y.shape == want_y.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want_y, rtol=1e-2, atol=1e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert got[1][1].abs().sum() == 0                  # the empty expert's weights: zero gradient, not None


def test_auto_dispatch_falls_back_for_unaligned_sizes():
    moe = make(expert_hidden=10)        # 10 floats = 40 bytes: not a multiple of 16
    assert not moe.experts.use_grouped_mm(torch.randn(3, 8))
    (message,) = moe_problems(expert_hidden=10, dispatch="grouped_mm")
    assert message.startswith("model.block.mlp.dispatch: grouped_mm needs d_model (8) and the expert hidden size "
                              "(10) to be multiples of 4")


# ----------------------------------------------------------------- init
def _trunc_std(sigma: float) -> float:
    """Std of a normal(0, sigma) truncated at +-2 sigma."""
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    return sigma * math.sqrt(1 - 2 * 2 * phi / z)


def test_switch_init_statistics():
    moe = make(d_model=64, n_experts=4, expert_hidden=128, n_shared_experts=1,
               router={"kind": "noisy_topk"})
    moe.init_weights(build(SwitchInit.Spec, {"scale": 0.1, "expert_scale": 0.05}, kind="switch", impl=SwitchInit))
    assert _trunc_std(1.0) == pytest.approx(0.8796, abs=1e-4)
    checks = [(moe.experts.up, 0.05, 64, 0.02), (moe.experts.down, 0.05, 128, 0.02),
              (moe.shared.up, 0.1, 64, 0.03), (moe.shared.down, 0.1, 128, 0.03),
              (moe.router.weight, 0.1, 64, 0.15)]
    for t, scale, fan_in, tol in checks:
        sigma = math.sqrt(scale / fan_in)
        assert t.std().item() == pytest.approx(_trunc_std(sigma), rel=tol)
        assert t.abs().max().item() <= 2 * sigma + 1e-7
    assert torch.count_nonzero(moe.router.noise_weight) == 0


def test_gpt2_init_scales_residual_down_projections():
    moe = make(d_model=64, expert_hidden=128, bias=True)
    with torch.no_grad():
        moe.experts.up_bias.fill_(1.0)
    moe.init_weights(build(GPT2Init.Spec, {"std": 0.02}, ctx={"n_layers": 8}, kind="gpt2", impl=GPT2Init))
    assert moe.experts.up.std().item() == pytest.approx(0.02, rel=0.03)
    assert moe.experts.down.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert torch.count_nonzero(moe.experts.up_bias) == 0


# ----------------------------------------------------------------- spec / registration / accounting
def test_inactive_params_and_meta_build():
    moe = make(bias=True, n_shared_experts=1)
    routed = 4 * (8 * 24 + 12 * 8 + 24 + 8)
    assert moe.inactive_params_per_token() == pytest.approx(routed * (1 - 2 / 4))
    with torch.device("meta"):
        m = MoE(moe.spec)
    assert m.experts.up.is_meta and sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for p in moe.parameters())


def test_expert_hidden_mult_rounds_up_to_16():
    spec = component_spec("mlp", {"kind": "moe", "n_experts": 4, "top_k": 1, "expert_hidden_mult": 0.7}, d_model=100)
    assert spec.hidden == 80   # 70 -> 80
    assert component_spec("mlp", {"kind": "moe", "n_experts": 4, "top_k": 1}, d_model=96).hidden == 256


@pytest.mark.parametrize("params,message", [
    ({"top_k": 5}, r"^model.block.mlp.top_k: top_k \(5\) must be <= n_experts \(4\)"),
    ({"expert_hidden_mult": 2.0}, "^model.block.mlp.expert_hidden_mult: give 'expert_hidden' or "
                                  "'expert_hidden_mult', not both$"),
    ({"router": {"kind": "switch"}}, "^model.block.mlp.top_k: router 'switch' .* top_k must be 1"),
    ({"router": {"kind": "topk", "jitter": 0.1}}, "^model.block.mlp.router.jitter: unknown key 'jitter' for "
                                                  "router kind 'topk'"),
    ({"top_kk": 2}, "did you mean 'top_k'"),
    ({"capacity_factor": 0}, "^model.block.mlp.capacity_factor: 0 is out of range; expected a value > 0$"),
    ({"drop_policy": "random"}, "^model.block.mlp.drop_policy: unknown value 'random'"),
    ({"expert_kind": "swiglu2"}, "did you mean 'swiglu'"),
    ({"router": {"kind": "sigmoid", "n_group": 3}}, r"^model.block.mlp.router.n_group: n_experts \(4\) must be "
                                                    r"divisible by n_group \(3\); choose n_group among 1, 2, 4$"),
    ({"router": {"kind": "sigmoid", "n_group": 2, "topk_group": 3}}, r"router.topk_group: topk_group \(3\) must "
                                                                     r"be <= n_group \(2\)$"),
])
def test_spec_errors(params, message):
    got = moe_problems(**params)
    assert len(got) == 1 and re.search(message, got[0]), got


def test_register():
    regs = new_catalog()
    register(regs)
    assert regs["mlp"].get("moe") is MoE
    assert {"noisy_topk", "sigmoid", "switch", "topk"} <= set(regs["router"].names())     # and any added later
    assert [regs["router"].get(k) for k in ("noisy_topk", "sigmoid", "switch", "topk")] == [
        NoisyTopKRouter, SigmoidRouter, SwitchRouter, TopKRouter]


@pytest.mark.parametrize("policy", ["priority", "position"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [None, 2])
def test_gather_and_combine_equal_the_scatter_formulation_with_gradients(policy, k, capacity):
    """The gather-only dispatch/combine (custom backward) against index_select + index_add_ autograd."""
    from nanodecoder.components.moe_dispatch import combine, gather_tokens, priority_layout
    g = torch.Generator().manual_seed(k)
    n, e, d = 7, 4, 3
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    plan = plan_dispatch(idx, e, capacity, policy)
    if capacity is not None:
        assert int(plan.n_dropped) > 0          # the case with dropped slots is exercised
    x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, generator=g, requires_grad=True)
    proj = torch.randn(d, d, dtype=torch.float64, generator=g)

    def ours(x, w):
        return combine(torch.tanh(gather_tokens(x, plan, policy) @ proj), w, plan, policy)

    def scatter(x, w):
        ys = torch.tanh(x.index_select(0, plan.token) @ proj)
        ws = priority_layout(w, policy)[plan.slot]
        return torch.zeros(n, d, dtype=x.dtype).index_add(0, plan.token, ys * ws[:, None])

    torch.testing.assert_close(ours(x, w), scatter(x, w))
    gy = torch.randn(n, d, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(ours(x, w), (x, w), gy)
    want = torch.autograd.grad(scatter(x, w), (x, w), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ours, (x, w))
