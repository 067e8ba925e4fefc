"""runtime.activation_checkpointing: each block recomputed in the backward gives the losses and gradients of the
plain run (dropout and router noise repeat: the RNG state is preserved), MoE aux losses and statistics included."""
from __future__ import annotations

import copy

import pytest
import torch

from nanodecoder.model import build_model
from nanodecoder.model.spec import build_model_spec
from nanodecoder.runtime import Runtime
from nanodecoder.runtime.core import Recomputed

BASE = {"vocab_size": 64, "context_length": 32, "d_model": 32, "n_layers": 3, "positional": {"kind": "rope"},
        "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}}}
MLPS = {
    "dense with dropout": {"kind": "swiglu"},
    "moe, noisy top-k, capacity": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32,
                                   "capacity_factor": 1.0, "router": {"kind": "noisy_topk"}},
    "moe, sigmoid with bias balancing": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32,
                                         "n_shared_experts": 1, "router": {"kind": "sigmoid"}},
}


def twins(mlp: dict):
    raw = {**BASE, "block": {**BASE["block"], "mlp": mlp}}
    if mlp["kind"] != "moe":
        raw.update(dropout=0.1)
        raw["block"]["attention"] = {**raw["block"]["attention"], "dropout": 0.1, "window": 8}
    spec = build_model_spec(raw)
    torch.manual_seed(0)
    plain = build_model(spec)
    checkpointed = copy.deepcopy(plain)
    Runtime(device=torch.device("cpu")).apply(plain)
    Runtime(device=torch.device("cpu"), activation_checkpointing=True).apply(checkpointed)
    assert all(isinstance(b, Recomputed) for b in checkpointed.blocks)
    assert not any(isinstance(b, Recomputed) for b in plain.blocks)
    return plain.train(), checkpointed.train()


def step(model, idx):
    torch.manual_seed(1)                        # the same dropout masks and router noise in both runs
    out = model(idx, idx.roll(-1, 1))
    out.loss.backward()
    return out


@pytest.mark.parametrize("name", sorted(MLPS))
def test_checkpointed_blocks_give_the_same_losses_gradients_and_stats(name):
    plain, checkpointed = twins(MLPS[name])
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    a, b = step(plain, idx), step(checkpointed, idx)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.ce_loss, a.ce_loss, rtol=0, atol=1e-6)
    if MLPS[name]["kind"] == "moe":
        assert b.aux_loss is not None and b.aux_loss.requires_grad
        torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=0, atol=1e-7)
        assert sorted(b.stats) == sorted(a.stats) and "layer2.load" in b.stats
        for key in a.stats:
            torch.testing.assert_close(b.stats[key], a.stats[key], rtol=0, atol=1e-7)
    grads = {n: p.grad for n, p in checkpointed.named_parameters()}
    for n, p in plain.named_parameters():
        assert grads[n] is not None, n
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_the_balancing_bias_update_is_unchanged():
    """The recomputed forward counts each token's experts again: the loads double, their fractions (which the
    bias update uses) do not."""
    plain, checkpointed = twins(MLPS["moe, sigmoid with bias balancing"])
    idx = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    for model in (plain, checkpointed):
        step(model, idx)
        model.after_optimizer_step()
    for a, b in zip(plain.modules(), checkpointed.modules()):
        if hasattr(a, "expert_bias"):
            assert a.expert_bias.abs().sum() > 0
            torch.testing.assert_close(b.expert_bias, a.expert_bias, rtol=0, atol=0)


def test_evaluation_and_sampling_do_not_recompute():
    plain, checkpointed = twins(MLPS["dense with dropout"])
    idx = torch.randint(0, 64, (1, 8))
    for model in (plain, checkpointed):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(idx).logits, plain(idx).logits)
        cache = checkpointed.new_kv_cache(1)
        assert checkpointed(idx, cache=cache, logits_to_keep=1).logits.shape == (1, 1, 64) and cache.pos == 8


def test_recomputed_blocks_keep_names_and_give_bit_identical_loss_and_gradients():
    """The runtime makes each block recompute itself (no attribute on the model): the module tree, parameter
    names and state-dict keys stay the plain model's (checkpoints, optimizer rules and saved optimizer parameter
    names are unchanged), and a dropout model's loss and gradients are bit for bit the plain model's."""
    plain, checkpointed = twins(MLPS["dense with dropout"])
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert not hasattr(checkpointed, "activation_checkpointing")
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(4))
    a, b = step(plain, idx), step(checkpointed, idx)
    assert torch.equal(a.loss, b.loss)
    grads = dict(checkpointed.named_parameters())
    for n, p in plain.named_parameters():
        assert torch.equal(grads[n].grad, p.grad), n
    # the recomputation really happens: the forward saves only each block's input for the backward
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        checkpointed(idx, idx.roll(-1, 1))
    plain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t) or t, lambda t: t):
        plain(idx, idx.roll(-1, 1))
    assert 0 < len(saved) < len(plain_saved) / 2
