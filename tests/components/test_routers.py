"""Routers: weight conventions, noise only in training, sigmoid bias balancing and its persistence."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodecoder.components import component_spec, model_catalog
from nanodecoder.components.init import DEFAULT_INIT
from nanodecoder.components.moe import MoE
from nanodecoder.components.routers import NoisyTopKRouter, Router, TopKRouter
from nanodecoder.config.declare import build

ROUTERS = {k: model_catalog()["router"].get(k) for k in model_catalog()["router"].names()}


def router(kind: str, k: int = 2, n: int = 4, **params):
    cls = ROUTERS[kind]
    torch.manual_seed(0)
    r = cls(build(cls.Spec, params, ctx={"d_model": 8, "n_experts": n, "top_k": k}, kind=kind, impl=cls))
    with torch.no_grad():
        r.weight.normal_(0.0, 0.5)
    return r


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_renormalisation(renormalize):
    r = router("topk", renormalize=renormalize)
    out = r(X)
    probs = X @ r.weight.t()
    probs = probs.softmax(-1)
    top = probs.topk(2, -1)
    assert torch.equal(out.indices, top.indices)
    want = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    torch.testing.assert_close(out.weights, want)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(32))


def test_topk_k1_never_renormalises():
    out = router("topk", k=1, renormalize=True)(X)
    torch.testing.assert_close(out.weights[:, 0], out.probs.max(-1).values)


def test_noisy_topk_noise_only_in_training_and_equals_topk_in_eval():
    for k, renorm in ((2, True), (1, False)):
        noisy, plain = router("noisy_topk", k=k), router("topk", k=k, renormalize=renorm)
        plain.load_state_dict({"weight": noisy.weight.detach()})
        noisy.eval()
        a, b = noisy(X), plain(X)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights)
        torch.testing.assert_close(noisy(X).weights, a.weights, rtol=0, atol=0)   # deterministic
        noisy.train()
        torch.manual_seed(1)
        t1 = noisy(X)
        torch.manual_seed(2)
        assert not torch.equal(t1.weights, noisy(X).weights)      # noise in training
        torch.testing.assert_close(t1.probs, b.probs)              # lb/z use the clean logits


def test_noisy_topk_with_zero_noise_draw_equals_topk_in_training():
    noisy, plain = router("noisy_topk"), router("topk")
    plain.load_state_dict({"weight": noisy.weight.detach()})
    noisy.train()
    noisy.sample_noise = torch.zeros_like
    a, b = noisy(X), plain(X)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)


def test_switch_jitter_only_in_training():
    r = router("switch", k=1, jitter=0.5)
    r.eval()
    torch.testing.assert_close(r(X).weights, router("switch", k=1)(X).weights)
    r.train()
    torch.manual_seed(3)
    assert not torch.equal(r(X).weights, r.eval()(X).weights)


def test_sigmoid_weights_and_bias_only_changes_selection():
    r = router("sigmoid", routed_scaling_factor=2.0)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))      # expert 0 always chosen
    out = r(X)
    assert (out.indices[:, 0] == 0).all()
    s = (X @ r.weight.t()).sigmoid()
    sel = s.gather(-1, out.indices)
    torch.testing.assert_close(out.weights, 2.0 * sel / sel.sum(-1, keepdim=True))
    torch.testing.assert_close(out.probs, s / s.sum(-1, keepdim=True))


def _skewed_moe(**router_params) -> tuple[MoE, torch.Tensor]:
    spec = component_spec("mlp", {"kind": "moe", "n_experts": 4, "top_k": 1, "expert_hidden": 8,
                                  "router": {"kind": "sigmoid", **router_params}}, d_model=8)
    torch.manual_seed(0)
    moe = MoE(spec)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.1)
        moe.router.weight[0] += 0.3               # inputs have mean +1: expert 0 dominates
    x = torch.randn(4, 32, 8, generator=torch.Generator().manual_seed(1)) + 1.0
    return moe, x


def _load_ratio(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        load = moe(x)[1]["load"]
    return (load.max() / load.min().clamp_min(1e-9)).item()


def test_bias_balancing_drives_load_ratio_down():
    moe, x = _skewed_moe(bias_update_speed=0.01)
    moe.train()
    start = _load_ratio(moe, x)
    for _ in range(150):
        with torch.no_grad():
            moe(x)
        moe.after_optimizer_step()
    end = _load_ratio(moe, x)
    assert start > 10 and end < 2.0, (start, end)
    assert abs(moe.router.expert_bias.sum().item()) < 1e-5          # centred: no drift
    assert moe.router.expert_bias.dtype == torch.float32
    assert not any(p is moe.router.expert_bias for p in moe.parameters())


def test_bias_counts_accumulate_over_micro_steps_and_reset():
    moe, x = _skewed_moe()
    moe.train()
    with torch.no_grad():
        moe(x)
        moe(x[:2])
    assert moe.router.load_counts.sum().item() == 128 + 64
    before = moe.router.expert_bias.clone()
    moe.after_optimizer_step()
    assert moe.router.load_counts.sum().item() == 0
    assert not torch.equal(before, moe.router.expert_bias)
    moe.eval()
    with torch.no_grad():
        moe(x)                                      # eval forwards do not count
    assert moe.router.load_counts.sum().item() == 0
    same = moe.router.expert_bias.clone()
    moe.after_optimizer_step()                      # nothing routed since: unchanged
    assert torch.equal(same, moe.router.expert_bias)


def test_bias_update_all_reduces_under_distributed(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        moe, x = _skewed_moe(bias_update_speed=0.1)
        moe.train()
        with torch.no_grad():
            moe(x)
        moe.after_optimizer_step()
        b = moe.router.expert_bias
        assert b[0].item() < 0 and abs(b.sum().item()) < 1e-6
    finally:
        dist.destroy_process_group()


def test_bias_survives_safetensors_round_trip(tmp_path):
    moe, x = _skewed_moe(bias_update_speed=0.05)
    moe.train()
    for _ in range(3):
        with torch.no_grad():
            moe(x)
        moe.after_optimizer_step()
    state = moe.state_dict()
    assert "router.expert_bias" in state and "router.load_counts" not in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "moe.safetensors")
    fresh, _ = _skewed_moe()
    fresh.load_state_dict(load_file(tmp_path / "moe.safetensors"))
    assert torch.equal(fresh.router.expert_bias, moe.router.expert_bias)
    assert fresh.router.expert_bias.abs().sum() > 0
    moe.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], moe(x)[0], rtol=0, atol=0)


def test_router_classes_are_the_registered_kinds():
    assert {"topk", "switch", "sigmoid", "noisy_topk"} <= set(ROUTERS)      # plug-ins may add more
    assert ROUTERS["topk"] is TopKRouter and ROUTERS["noisy_topk"] is NoisyTopKRouter
    for cls in ROUTERS.values():
        assert issubclass(cls, Router)
        assert {"dim", "n_experts", "top_k"} <= {f.name for f in dataclasses.fields(cls.Spec)}


def test_init_weights_resets_buffers_after_to_empty():
    """The builder's ``materialize`` does meta -> ``to_empty`` -> ``init_weights``."""
    moe, _ = _skewed_moe()
    with torch.device("meta"):
        meta = MoE(moe.spec)
    real = meta.to_empty(device="cpu")
    real.router.expert_bias.fill_(float("nan"))
    real.router.load_counts.fill_(7)
    real.init_weights(DEFAULT_INIT)
    assert torch.equal(real.router.expert_bias, torch.zeros(4))
    assert torch.equal(real.router.load_counts, torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------ router bias, group-limited routing
def test_a_router_bias_enters_the_logits():
    r = router("topk", k=2, n=4, bias=True)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    out = r(x)
    torch.testing.assert_close(out.logits, x @ r.weight.t() + r.bias)
    fresh = router("topk", k=2, n=4, bias=True)
    assert torch.count_nonzero(fresh.bias) == 0 and "bias" in dict(fresh.named_parameters())
    assert "bias" not in dict(router("topk", k=2, n=4).named_parameters())


def naive_group_limited(scores, bias, n_group, topk_group, k):
    """Per token: group score = sum of the group's two largest (score + bias); experts of the best groups only."""
    out = []
    per = scores.shape[1] // n_group
    for s in scores + bias:
        groups = sorted(range(n_group), key=lambda g: -float(s[g * per:(g + 1) * per].topk(2).values.sum()))
        allowed = [e for g in groups[:topk_group] for e in range(g * per, (g + 1) * per)]
        out.append(sorted(allowed, key=lambda e: -float(s[e]))[:k])
    return out


def test_group_limited_routing_picks_experts_only_in_the_best_groups():
    r = router("sigmoid", k=3, n=8, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    out = r(x)
    s = (x @ r.weight.t()).sigmoid().detach()
    want = naive_group_limited(s, r.expert_bias, 4, 2, 3)
    assert [sorted(row) for row in out.indices.tolist()] == [sorted(row) for row in want]
    sel = s.gather(-1, out.indices)
    torch.testing.assert_close(out.weights, 2.5 * sel / sel.sum(-1, keepdim=True))
    ungrouped = router("sigmoid", k=3, n=8)
    with torch.no_grad():
        ungrouped.weight.copy_(r.weight)
        ungrouped.expert_bias.copy_(r.expert_bias)
    assert (ungrouped(x).indices.sort().values != out.indices.sort().values).any()   # the limit did something
