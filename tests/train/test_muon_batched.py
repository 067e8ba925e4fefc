"""``newton_schulz: batched``: torch.optim.Muon's update with the iterations stacked, 3-D experts included."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from nanodecoder.train import build_optimizer
from nanodecoder.train.newton_schulz import BatchedMuon, newton_schulz_batched
from nanodecoder.train.optim import OptimizerSetupError
from test_muon import CPU, MUON, optimizer, resumes_bit_for_bit, tiny_model

COEFFS = (3.4445, -4.775, 2.0315)
BATCHED = {**MUON, "newton_schulz": "batched"}


@pytest.mark.parametrize("shape", [(3, 16, 16), (4, 8, 24), (2, 40, 12)])   # square, wide, tall
def test_batched_iteration_equals_torch_on_each_slice(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    got = newton_schulz_batched(g, COEFFS, 5, 1e-7)
    assert got.shape == g.shape and got.dtype == torch.bfloat16
    for i in range(shape[0]):
        ref = _zeropower_via_newtonschulz(g[i], COEFFS, 5, 1e-7)
        torch.testing.assert_close(got[i].float(), ref.float(), atol=2e-2, rtol=0)
    # what the iteration is for: singular values pulled towards 1 (into about [0.5, 1.5])
    sv = torch.linalg.svdvals(got.double())
    assert sv.min() > 0.3 and sv.max() < 1.6


def test_a_step_on_2d_matrices_equals_torch_muon():
    ours, ref = tiny_model(tie=False), tiny_model(tie=False)
    ref.load_state_dict(ours.state_dict())
    initial = copy.deepcopy(ours.state_dict())
    common = {"weight_decay": 0.05, "momentum": 0.9, "ns_steps": 4, "adjust_lr_fn": "match_rms_adamw"}
    batched = build_optimizer(optimizer({**BATCHED, **common}), ours, 0.02, CPU)
    plain = build_optimizer(optimizer({**MUON, **common}), ref, 0.02, CPU)
    assert isinstance(batched.muon, BatchedMuon) and type(plain.muon) is torch.optim.Muon
    x = torch.randint(0, 256, (4, 16))
    for _ in range(3):                        # momentum buffers after the first step
        for model, opt in ((ours, batched), (ref, plain)):
            model(x, x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(a, initial[name]), name
    saved = batched.state_dict()               # the same state layout: torch's Muon takes it
    plain.load_state_dict(saved)


def test_3d_experts_are_orthogonalised_expert_by_expert_like_torch_muon_on_each_slice():
    model = tiny_model(moe=True)
    spec = optimizer({**BATCHED, "weight_decay": 0.0, "rules": [{"roles": ["expert"], "optimizer": "muon"}]})
    opt = build_optimizer(spec, model, 0.02, CPU)
    on_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    up = model.blocks[0].mlp.experts.up
    assert up.ndim == 3 and id(up) in on_muon
    x = torch.randint(0, 256, (4, 16))
    model(x, x).loss.backward()
    before, grad = up.detach().clone(), up.grad.clone()
    slices = [torch.nn.Parameter(before[e].clone()) for e in range(up.shape[0])]
    for s, e in zip(slices, range(up.shape[0])):
        s.grad = grad[e].clone()
    reference = torch.optim.Muon(slices, lr=0.02, weight_decay=0.0)
    opt.step()
    reference.step()
    for e, s in enumerate(slices):
        torch.testing.assert_close(up[e], s, atol=1e-5, rtol=0)
    assert not torch.equal(up, before)


def test_3d_parameters_to_torch_muon_are_refused_naming_the_batched_option():
    spec = optimizer({**MUON, "rules": [{"roles": ["expert"], "optimizer": "muon"}]})
    with pytest.raises(OptimizerSetupError, match=r"'blocks.0.mlp.experts.up' \(shape \(4, 32, 64\)\) to Muon, "
                                                  r"which updates only 2-D matrices.*newton_schulz: batched"):
        build_optimizer(spec, tiny_model(moe=True), 0.02, CPU)
    with pytest.raises(ValueError, match="2-D matrices and 3-D stacks"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))])


def test_resume_with_batched_muon_and_muon_experts_is_bit_for_bit(tmp_path):
    resumes_bit_for_bit(tmp_path, {"lr": 0.02, "optimizer": {**BATCHED, "rules": [{"roles": ["expert"],
                                                                                     "optimizer": "muon"}]}})
