"""Parameter groups of AdamW and the learning-rate schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.cli.catalog import catalog
from nanodecoder.config import BlueprintError
from nanodecoder.config.declare import BuildError, build, build_choice
from nanodecoder.config.registry import RegistryError
from nanodecoder.train import build_optimizer, build_schedule
from nanodecoder.train.optim import AdamW, param_groups
from nanodecoder.train.schedule import WSD, Constant, Cosine
from trainhelpers import write_blueprint


def choice(category: str, raw: dict):
    """The spec of a ``{kind: ..., params}`` block, as the blueprint builds it."""
    return build_choice(catalog(), category, raw, None, {})


def schedule(cls, kind: str, params: dict, total_steps: int, base_lr: float):
    """A schedule built as the registry builds it: ``cls(spec, total_steps, base_lr)``."""
    return cls(build(cls.Spec, params, kind=kind, impl=cls), total_steps=total_steps, base_lr=base_lr)


class Toy(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.pos = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)            # weight decayed, bias not
        self.norm = nn.LayerNorm(4)           # never decayed
        self.experts = nn.Parameter(torch.zeros(3, 4, 4))  # 3-D: decayed
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.wte.weight


def ids(ps):
    return {id(p) for p in ps}


def test_groups_decay_matrices_not_vectors_and_tied_weight_once():
    m = Toy()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([m.wte.weight, m.pos.weight, m.lin.weight, m.experts])
    assert ids(no_decay["params"]) == ids([m.lin.bias, m.norm.weight, m.norm.bias])
    everything = decay["params"] + no_decay["params"]
    assert len(everything) == len(ids(everything)) == len(list(m.parameters()))


def test_decay_embeddings_false_excludes_embeddings_and_the_tied_head():
    m = Toy()
    decay, no_decay = param_groups(m, 0.1, decay_embeddings=False)
    assert ids(decay["params"]) == ids([m.lin.weight, m.experts])
    assert id(m.wte.weight) in ids(no_decay["params"]) and id(m.pos.weight) in ids(no_decay["params"])
    m = Toy(tie=False)
    decay, _ = param_groups(m, 0.1, decay_embeddings=False)
    assert id(m.head.weight) in ids(decay["params"])  # an untied head is a real matrix


def test_adamw_from_registry_uses_the_fused_kernel_on_cpu_and_blueprint_params():
    m = Toy()
    opt = build_optimizer(choice("optimizer", {"kind": "adamw", "betas": [0.9, 0.99], "eps": 1e-6,
                                               "weight_decay": 0.2}), m, 3e-4, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["fused"] is True and not g["foreach"]
    assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 and g["lr"] == 3e-4 and g["weight_decay"] == 0.2
    assert AdamW.kernel_flags("auto", torch.device("cuda")) == {"fused": True}
    assert AdamW.kernel_flags("for-loop", torch.device("cpu")) == {"foreach": False}
    assert AdamW.kernel_flags("auto", torch.device("meta")) == {"foreach": True}   # no fused kernel there


def test_fused_and_foreach_adamw_take_the_same_steps():
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    opts = [build_optimizer(choice("optimizer", {"kind": "adamw", "implementation": impl}), m, 1e-2,
                            torch.device("cpu"))
            for impl, m in (("fused", a), ("foreach", b))]
    for p in a.parameters():
        torch.nn.init.normal_(p)
    b.load_state_dict(a.state_dict())
    targets = [torch.randn_like(p) for p in a.parameters()]
    for _ in range(5):
        for m, opt in zip((a, b), opts):
            sum(((p - t) ** 2).sum() for p, t in zip(m.parameters(), targets)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_cosine_warmup_decay_and_floor():
    s = schedule(Cosine, "cosine", {"warmup_steps": 10, "min_lr_ratio": 0.1}, total_steps=110, base_lr=1.0)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)           # half way through the decay
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))        # monotone decay
    absolute = schedule(Cosine, "cosine", {"warmup_steps": 0, "min_lr": 1e-4, "decay_steps": 50},
                        total_steps=100, base_lr=1e-3)
    assert absolute(0) == pytest.approx(1e-3) and absolute(50) == pytest.approx(1e-4)
    assert absolute(75) == pytest.approx(1e-4)


def test_wsd_phases_and_shapes():
    s = schedule(WSD, "wsd", {"warmup_steps": 5, "decay_fraction": 0.2}, total_steps=100, base_lr=2.0)
    assert s(0) == pytest.approx(0.4) and s(4) == pytest.approx(2.0)
    assert s(50) == s(79) == pytest.approx(2.0)                 # stable
    assert s(80) == pytest.approx(2.0 * (1 - 1 / 20))           # decay starts
    assert s(99) == pytest.approx(0.0)                          # last step reaches the floor
    for shape in ("cosine", "sqrt"):
        t = schedule(WSD, "wsd", {"warmup_steps": 0, "decay_fraction": 0.5, "decay_shape": shape,
                                  "min_lr_ratio": 0.1}, total_steps=10, base_lr=1.0)
        vals = [t(i) for i in range(10)]
        assert vals[:5] == [1.0] * 5 and vals[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    mid = schedule(WSD, "wsd", {"warmup_steps": 0, "decay_fraction": 0.5, "decay_shape": "sqrt"},
                   total_steps=8, base_lr=1.0)
    assert mid(4) == pytest.approx(1 - math.sqrt(0.25))


def test_constant_and_registry_lookup(tmp_path):
    c = build_schedule(choice("schedule", {"kind": "constant", "warmup_steps": 4}), total_steps=10, base_lr=0.5)
    assert isinstance(c, Constant)
    assert [c(i) for i in range(6)] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    with pytest.raises(RegistryError, match="did you mean 'cosine'"):
        catalog()["schedule"].get("cosin")
    with pytest.raises(BuildError, match="unknown schedule kind 'cosin'.*cosine"):
        choice("schedule", {"kind": "cosin"})
    bp = write_blueprint(tmp_path, train={"schedule": {"kind": "cosin"}})     # what a blueprint user sees
    with pytest.raises(BlueprintError, match=r"train.schedule.kind \(line \d+\): unknown schedule kind "
                                             r"'cosin'; did you mean 'cosine'"):
        load_blueprint(bp)


@pytest.mark.parametrize("schedule", [{"kind": "constant", "warmup_steps": 3},
                                      {"kind": "cosine", "warmup_steps": 7, "min_lr_ratio": 0.1},
                                      {"kind": "cosine", "warmup_steps": 7, "decay_steps": 30},
                                      {"kind": "wsd", "warmup_steps": 5, "decay_fraction": 0.3},
                                      {"kind": "wsd", "warmup_steps": 5, "decay_fraction": 0.3,
                                       "decay_shape": "sqrt"}])
def test_free_steps_have_the_same_learning_rate_for_every_length(schedule):
    """What free_steps() claims (a time budget re-plans the run's length there) holds."""
    spec = choice("schedule", schedule)
    for total in (20, 33, 50, 200):
        s = build_schedule(spec, total, 1.0)
        free = s.free_steps()
        n = total if free is None else free
        assert n <= total or free is None
        for other in (total + 1, total * 2, total * 7):
            o = build_schedule(spec, other, 1.0)
            assert [s(i) for i in range(min(n, total))] == [o(i) for i in range(min(n, total))]
        if free is not None and free < total:     # and the first step after them does depend on the length
            assert any(s(free) != build_schedule(spec, other, 1.0)(free) for other in (total + 1, total * 2))
