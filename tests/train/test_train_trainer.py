"""The Trainer's mechanics: accumulation, clipping, non-finite guard, evaluation, exact state restore."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from nanodecoder.data import BatchSampler, bits_per_byte
from nanodecoder.train.checkpoint import load_model_weights, load_state, save_checkpoint
from nanodecoder.train.metrics import MoEMonitor
from nanodecoder.train.trainer import NonFiniteLoss, StateMismatch
from trainhelpers import make_trainer


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    tr = make_trainer(tmp_path, dropout=0.0, batch_size=2, grad_accum=2, grad_clip=None)
    reference = copy.deepcopy(tr.model)
    sampler = BatchSampler(tr.prep.train, 2, 16, seed=tr.spec.seed)
    (x1, y1), (x2, y2) = sampler.next_batch(), sampler.next_batch()
    reference(torch.cat([x1, x2]), torch.cat([y1, y2])).loss.backward()
    captured = {}
    real_step = tr.optimizer.step

    def spy_step(*a, **k):
        captured.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
        return real_step(*a, **k)
    tr.optimizer.step = spy_step
    out = tr.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(captured[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert out.grad_norm is None and tr.step_count == 1 and tr.tokens_seen == 2 * 2 * 16
    assert all(p.grad is None for p in tr.model.parameters())  # set_to_none


def test_clipping_reports_the_norm_before_clipping(tmp_path):
    tr = make_trainer(tmp_path, grad_clip=1e-3)
    out = tr.step()
    assert out.grad_norm.item() > 1e-3 and out.lr == tr.schedule(0)


def poison(model, calls: set[int]):
    """Make the loss NaN on the given forward calls (1-based)."""
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        if count["n"] in calls and output.loss is not None:
            output.loss = output.loss * float("nan")
        return output
    return model.register_forward_hook(hook)


def test_nan_stop_names_the_step(tmp_path):
    tr = make_trainer(tmp_path)
    poison(tr.model, {3})
    tr.step(), tr.step()
    with pytest.raises(NonFiniteLoss, match="non-finite loss .* at step 3;.*nan_policy: skip"):
        tr.step()
    assert tr.step_count == 2


def test_nan_skip_drops_the_update_and_continues(tmp_path):
    tr = make_trainer(tmp_path, nan_policy="skip", max_skipped_steps=1)
    poison(tr.model, {2, 4})
    tr.step()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    assert tr.step().skipped
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert not tr.step().skipped and tr.step_count == 3 and tr.skipped == 1
    with pytest.raises(NonFiniteLoss, match="at step 4 .*2 steps skipped, more than train.max_skipped_steps = 1"):
        tr.step()


def test_evaluation_sees_the_same_batches_and_reports_bpb(tmp_path):
    tr = make_trainer(tmp_path, dropout=0.3)
    first = tr.evaluate()
    tr.sampler.next_batch()           # training progress does not move the eval batches
    assert tr.evaluate() == first and tr.model.training
    m = tr.prep.manifest
    assert first["val_bpb"] == pytest.approx(bits_per_byte(first["val_loss"], m["n_tokens"]["val"],
                                                           m["n_bytes"]["val"]))
    assert math.log(256) - 1 < first["val_loss"] < math.log(256) + 1


def test_state_restore_continues_bit_for_bit(tmp_path):
    straight = make_trainer(tmp_path)
    losses = [straight.step().loss.item() for _ in range(6)]
    first = make_trainer(tmp_path)
    assert [first.step().loss.item() for _ in range(3)] == losses[:3]
    ckpt = save_checkpoint(tmp_path / "ckpt" / "step_000003", first.model, first.state_dict())
    torch.manual_seed(999)            # disturb every RNG the restore must put back
    resumed = make_trainer(tmp_path, model_seed=123)
    load_model_weights(resumed.model, ckpt)
    resumed.load_state_dict(load_state(ckpt))
    assert resumed.step_count == 3 and resumed.sampler.batches == 3
    assert [resumed.step().loss.item() for _ in range(3)] == losses[3:]
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_state_of_another_optimizer_setup_is_refused(tmp_path):
    tr = make_trainer(tmp_path)
    tr.step()
    state = tr.state_dict()
    state["optimizer_params"] = state["optimizer_params"][:-1]
    with pytest.raises(StateMismatch, match="other parameters"):
        make_trainer(tmp_path).load_state_dict(state)


def test_moe_step_reports_aux_loss_stats_and_calls_the_balancing_hook(tmp_path):
    tr = make_trainer(tmp_path, moe=True)
    calls = []
    tr.raw_model.after_optimizer_step = lambda: calls.append(1)
    tr._has_hook = True
    out = tr.step()
    assert calls == [1] and out.aux_loss is not None and out.aux_loss.item() > 0
    metrics = MoEMonitor().metrics(out.stats, step=1)
    load = metrics["moe/layer0/load"]
    assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-5)
    assert {"moe/layer1/lb_loss", "moe/layer1/dropped_frac", "moe/layer1/router_entropy",
            "moe/empty_experts"} <= set(metrics)


def test_moe_monitor_ratio_and_empty_expert_warning():
    warnings = []
    mon = MoEMonitor(warn_after=3, warn=warnings.append)
    skewed = {"layer2.load": torch.tensor([0.5, 0.5, 0.0, 0.0]), "layer2.dropped_frac": torch.tensor(0.1)}
    for step in (10, 20):
        row = mon.metrics(skewed, step)
    assert row["moe/layer2/load_max_min"] is None and row["moe/empty_experts"] == 2 and not warnings
    mon.metrics(skewed, 30)
    assert len(warnings) == 2 and "step 30: expert 2 of layer 2 received no tokens for 3 log steps" in warnings[0]
    mon.metrics(skewed, 40)
    assert len(warnings) == 2                          # warned once per expert
    row = mon.metrics({"layer2.load": torch.tensor([0.4, 0.2, 0.2, 0.2])}, 50)
    assert row["moe/layer2/load_max_min"] == pytest.approx(2.0) and mon.load == {2: pytest.approx([0.4, 0.2, 0.2, 0.2])}
