"""MoE output, aux loss and gradients against a naive float64 per-token reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanodecoder.components import component_spec
from nanodecoder.components.moe import MoE

D, E, H = 8, 4, 12


def build(router: dict, top_k: int, **params) -> MoE:
    p = {"kind": "moe", "n_experts": E, "top_k": top_k, "expert_hidden": H, "router": router,
         "min_capacity": 0, **params}
    torch.manual_seed(0)
    moe: MoE = component_spec("mlp", p, d_model=D).build()
    with torch.no_grad():  # non-trivial biases and router so every term matters
        for name, prm in moe.named_parameters():
            if "bias" in name or name == "router.noise_weight":
                prm.normal_(0.0, 0.3)
            if name == "router.weight":
                prm.normal_(0.0, 0.7)
        if hasattr(moe.router, "expert_bias"):
            moe.router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.05, -0.25]))
    return moe


def act(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "swiglu":
        return F.silu(h[: h.shape[0] // 2]) * h[h.shape[0] // 2:]   # [gate | up]
    if kind == "gelu":
        return F.gelu(h)
    return F.relu(h) ** 2


def expert(P: dict, prefix: str, e: int, v: torch.Tensor, kind: str) -> torch.Tensor:
    h = v @ P[f"{prefix}.up"][e]
    if f"{prefix}.up_bias" in P:
        h = h + P[f"{prefix}.up_bias"][e]
    y = act(kind, h) @ P[f"{prefix}.down"][e]
    if f"{prefix}.down_bias" in P:
        y = y + P[f"{prefix}.down_bias"][e]
    return y


def route_token(moe: MoE, P: dict, v: torch.Tensor, noise: torch.Tensor | None):
    """(chosen experts, weights, clean logits, probs) of one token, by the documented formulas."""
    s, kind, k = moe.spec.router, moe.spec.router.kind, moe.spec.top_k
    logits = P["router.weight"] @ v
    def top(score):
        return sorted(range(E), key=lambda e: -float(score[e].detach()))[:k]
    if kind in ("topk", "switch"):
        probs = logits.softmax(-1)
        sel = top(probs)
        w = probs[sel]
        if kind == "topk" and s.renormalize and k > 1:
            w = w / w.sum()
    elif kind == "sigmoid":
        aff = torch.sigmoid(logits)
        sel = top(aff + moe.router.expert_bias.double())
        w = aff[sel] / aff[sel].sum() if k > 1 else aff[sel]
        w = w * s.routed_scaling_factor
        probs = aff / aff.sum()
    else:  # noisy_topk
        noisy = logits if noise is None else logits + F.softplus(P["router.noise_weight"] @ v) * noise
        sel = top(noisy)
        w = noisy[sel].softmax(-1) if k > 1 else noisy.softmax(-1)[sel]
        probs = logits.softmax(-1)
    return sel, w, logits, probs


def reference(moe: MoE, x: torch.Tensor, noise: torch.Tensor | None):
    """Loops over tokens, choice ranks and experts, in float64."""
    spec = moe.spec
    P = {n: p.detach().double().requires_grad_() for n, p in moe.named_parameters()}
    xs = x.detach().double().requires_grad_()
    B, T, _ = x.shape
    flat = xs.reshape(B * T, D)
    routes = [route_token(moe, P, flat[t], None if noise is None else noise[t]) for t in range(B * T)]
    factor = spec.capacity_factor if moe.training else spec.eval_factor
    cap = math.inf if factor is None else max(spec.min_capacity, math.ceil(factor * B * T * spec.top_k / E))
    used = [0] * E
    keep = {}
    for r in range(spec.top_k):                 # priority: all first choices, then second ...
        for t in range(B * T):                  # ... and earlier tokens first
            e = routes[t][0][r]
            keep[t, r] = used[e] < cap
            used[e] += keep[t, r]
    out = []
    for t in range(B * T):
        sel, w = routes[t][0], routes[t][1]
        y = torch.zeros(D, dtype=torch.float64)
        for r, e in enumerate(sel):
            if keep[t, r]:
                y = y + w[r] * expert(P, "experts", e, flat[t], spec.expert_kind)
        for e in range(spec.n_shared_experts):
            y = y + expert(P, "shared", e, flat[t], spec.expert_kind)
        out.append(y)
    y = torch.stack(out).view(B, T, D)
    groups = B if spec.lb_loss_type == "sequence" else 1
    lb = 0.0
    for g in range(groups):
        toks = range(g * (B * T // groups), (g + 1) * (B * T // groups))
        f = [sum(routes[t][0].count(e) for t in toks) / (len(toks) * spec.top_k) for e in range(E)]
        p = torch.stack([routes[t][3] for t in toks]).mean(0)
        lb = lb + E * sum(f[e] * p[e] for e in range(E)) / groups
    z = torch.stack([torch.logsumexp(routes[t][2], -1) ** 2 for t in range(B * T)]).mean()
    dropped = sum(not kept for kept in keep.values()) / len(keep)
    return y, spec.lb_loss_coef * lb + spec.z_loss_coef * z, dropped, xs, P


ROUTERS = [({"kind": "topk"}, 2), ({"kind": "topk", "renormalize": False}, 2), ({"kind": "switch"}, 1),
           ({"kind": "sigmoid", "routed_scaling_factor": 2.5}, 2), ({"kind": "sigmoid"}, 1),
           ({"kind": "noisy_topk"}, 2), ({"kind": "noisy_topk"}, 1)]


@pytest.mark.parametrize("router,k", ROUTERS, ids=lambda v: v["kind"] if isinstance(v, dict) else f"k{v}")
@pytest.mark.parametrize("capacity", [None, 0.6])
@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_matches_float64_reference(router, k, capacity, dispatch):
    moe = build(router, k, capacity_factor=capacity, dispatch=dispatch, n_shared_experts=1,
                lb_loss_type="sequence" if capacity else "batch", z_loss_coef=0.01, lb_loss_coef=0.1)
    moe.train()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert moe.experts.use_grouped_mm(x.reshape(10, D)) == (dispatch == "grouped_mm")
    torch.manual_seed(7)
    y, aux = moe(x)
    noise = None
    if router["kind"] == "noisy_topk":   # the same draw the router made
        torch.manual_seed(7)
        noise = torch.randn(10, E).double()
    y_ref, loss_ref, dropped_ref, xs, P = reference(moe, x, noise)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["loss"].double(), loss_ref, rtol=1e-5, atol=1e-7)
    assert aux["dropped_frac"].item() == pytest.approx(dropped_ref)
    if capacity:
        assert dropped_ref > 0   # the case really exercises dropping
    g = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    ((y * g).sum() + aux["loss"]).backward()
    ((y_ref * g.double()).sum() + loss_ref).backward()
    torch.testing.assert_close(x.grad.double(), xs.grad, rtol=1e-4, atol=1e-6)
    for name, prm in moe.named_parameters():
        ref = P[name].grad if P[name].grad is not None else torch.zeros_like(P[name])
        torch.testing.assert_close(prm.grad.double(), ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["gelu", "relu2"])
def test_reference_other_activations_with_bias_eval(kind):
    moe = build({"kind": "topk"}, 2, expert_kind=kind, bias=True, n_shared_experts=2,
                capacity_factor=0.5, eval_capacity_factor=0.75)
    moe.eval()
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y, aux = moe(x)
    y_ref, loss_ref, _, xs, P = reference(moe, x, None)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()          # zero-stride upstream gradient, straight on the output
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), xs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moe.experts.up_bias.grad.double(), P["experts.up_bias"].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("router,k", [({"kind": "topk"}, 1), ({"kind": "topk"}, 2), ({"kind": "switch"}, 1),
                                      ({"kind": "sigmoid"}, 1), ({"kind": "sigmoid"}, 2),
                                      ({"kind": "noisy_topk"}, 1), ({"kind": "noisy_topk"}, 2)],
                         ids=lambda v: v["kind"] if isinstance(v, dict) else f"k{v}")
def test_router_gets_gradient_from_task_loss(router, k):
    """Without aux losses the router must still learn, also at k = 1 (no constant weights)."""
    moe = build(router, k, lb_loss_coef=0.0, z_loss_coef=0.0).train()
    x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(4))
    y, aux = moe(x)
    assert aux["loss"].item() == 0.0
    (y * torch.randn_like(y)).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    if router["kind"] == "noisy_topk":
        assert moe.router.noise_weight.grad.abs().sum() > 0
