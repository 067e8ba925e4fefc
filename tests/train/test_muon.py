"""kind: muon -- torch.optim.Muon for the hidden matrices, torch.optim.AdamW for the rest, split by rules."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.cli.catalog import catalog
from nanodecoder.config import BlueprintError
from nanodecoder.config.declare import build_choice
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.train import build_optimizer
from nanodecoder.train.checkpoint import load_model_weights, load_state, save_checkpoint
from nanodecoder.train.metrics import read_rows
from nanodecoder.train.optim import MuonWithAdamW, OptimizerSetupError
from nanodecoder.train.schedule import set_lr
from nanodecoder.train.trainer import StateMismatch
from trainhelpers import REPO, make_trainer, subprocess_env, tiny_raw, train_tiny, write_blueprint

CPU = torch.device("cpu")
MUON = {"kind": "muon", "adamw": {"lr": 0.004}}


def optimizer(raw: dict):
    return build_choice(catalog(), "optimizer", raw, None, {})


def tiny_model(moe: bool = False, tie: bool = True, seed: int = 0):
    raw = tiny_raw(Path("."), moe=moe)["model"]
    raw["tie_embeddings"] = tie
    raw["dropout"] = 0.0
    return build_model(build_model_spec(raw, 256), seed=seed)


def groups_by_name(model, opt) -> list[tuple[str, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["optimizer"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]


def expected_on_muon(model) -> set[str]:
    """The standard split, written independently of the rules: 2-D weights of attention, dense MLPs and routers."""
    return {n for n, p in model.named_parameters()
            if p.ndim == 2 and not n.startswith(("wte.", "pos.", "head.")) and ".experts." not in n}


@pytest.mark.parametrize("moe,tie", [(False, True), (False, False), (True, True), (True, False)])
def test_standard_split_puts_every_parameter_in_exactly_one_group(moe, tie):
    model = tiny_model(moe=moe, tie=tie)
    opt = build_optimizer(optimizer(MUON), model, 0.02, CPU)
    assert isinstance(opt, MuonWithAdamW)
    placed = [n for _, ns in groups_by_name(model, opt) for n in ns]
    assert sorted(placed) == sorted(n for n, _ in model.named_parameters())       # each exactly once
    on_muon = {n for kind, ns in groups_by_name(model, opt) if kind == "muon" for n in ns}
    assert on_muon == expected_on_muon(model) and on_muon
    assert [g["optimizer"] for g in opt.param_groups] == ["muon", "adamw", "adamw"]
    assert all(p.ndim == 2 for g in opt.muon.param_groups for p in g["params"])
    decay, no_decay = (dict(zip(("params", "weight_decay"), (g["params"], g["weight_decay"])))
                       for g in opt.adamw.param_groups)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    adamw_names = {n for kind, ns in groups_by_name(model, opt) if kind == "adamw" for n in ns}
    assert "wte.weight" in adamw_names and ("head.weight" in adamw_names) == (not tie)
    if moe:
        assert {"blocks.0.mlp.experts.up", "blocks.1.mlp.experts.down"} <= adamw_names      # 3-D: AdamW
        assert "blocks.0.mlp.router.weight" in on_muon
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.004, 0.004]


def test_rules_move_parameters_and_give_the_untied_head_its_own_lr():
    model = tiny_model(moe=True, tie=False)
    rules = [{"names": ["blocks.*.mlp.router.weight"], "optimizer": "adamw"},
             {"roles": ["head"], "lr": 0.001},
             {"names": ["blocks.1.attn.*"], "weight_decay": 0.0}]
    opt = build_optimizer(optimizer({**MUON, "rules": rules}), model, 0.02, CPU)
    by = {n: (g["optimizer"], g["lr"], g["weight_decay"]) for g in opt.param_groups
          for n in [k for k, p in model.named_parameters() if any(p is q for q in g["params"])]}
    assert by["blocks.0.mlp.router.weight"][0] == by["blocks.1.mlp.router.weight"][0] == "adamw"
    assert by["head.weight"] == ("adamw", 0.001, 0.1)
    assert by["blocks.1.attn.qkv.weight"] == ("muon", 0.02, 0.0) and by["blocks.0.attn.qkv.weight"] == \
        ("muon", 0.02, 0.1)
    set_lr(opt, 0.01)                                 # the schedule at half the peak: every group at half its own
    assert by["head.weight"][1] * 0.5 == pytest.approx(
        next(g["lr"] for g in opt.param_groups if any(p is model.head.weight for p in g["params"])))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(sorted([0.01, 0.01, 0.002, 0.002, 0.0005]))
    # the head moved to Muon by a rule (a 2-D matrix: allowed)
    opt = build_optimizer(optimizer({**MUON, "rules": [{"roles": ["head"], "optimizer": "muon"}]}), model, 0.02, CPU)
    assert any(p is model.head.weight for g in opt.muon.param_groups for p in g["params"])


def test_adamw_rules_give_the_untied_head_its_own_lr_and_keep_the_two_standard_groups():
    model = tiny_model(tie=False)
    opt = build_optimizer(optimizer({"kind": "adamw", "rules": [{"roles": ["head"], "lr": 0.002}]}), model, 0.01, CPU)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 3
    head = opt.param_groups[2]
    assert head["params"] == [model.head.weight] and head["lr"] == 0.002 and head["weight_decay"] == 0.1
    set_lr(opt, 0.005)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.005, 0.001])
    plain = build_optimizer(optimizer({"kind": "adamw"}), model, 0.01, CPU)
    assert len(plain.param_groups) == 2 and sum(len(g["params"]) for g in plain.param_groups) == \
        len(list(model.parameters()))


def test_one_step_equals_torch_muon_and_adamw_applied_by_hand():
    torch.manual_seed(0)
    ours, ref = tiny_model(moe=True, tie=False), tiny_model(moe=True, tie=False)
    ref.load_state_dict(ours.state_dict())
    initial = copy.deepcopy(ours.state_dict())
    spec = optimizer({"kind": "muon", "weight_decay": 0.05, "momentum": 0.9, "ns_steps": 4,
                      "adjust_lr_fn": "match_rms_adamw",
                      "adamw": {"lr": 0.004, "betas": [0.8, 0.95], "eps": 1e-10, "weight_decay": 0.01}})
    opt = build_optimizer(spec, ours, 0.02, CPU)
    on_muon = expected_on_muon(ref)
    named = dict(ref.named_parameters())
    muon = torch.optim.Muon([named[n] for n in named if n in on_muon], lr=0.02, weight_decay=0.05, momentum=0.9,
                            nesterov=True, ns_steps=4, adjust_lr_fn="match_rms_adamw")
    rest = [n for n in named if n not in on_muon]
    adamw = torch.optim.AdamW([{"params": [named[n] for n in rest if named[n].ndim >= 2], "weight_decay": 0.01},
                               {"params": [named[n] for n in rest if named[n].ndim < 2], "weight_decay": 0.0}],
                              lr=0.004, betas=(0.8, 0.95), eps=1e-10, fused=True)
    x = torch.randint(0, 256, (4, 16))
    for factor in (1.0, 0.5):                         # two steps: momentum buffers, and a scheduled lr
        set_lr(opt, 0.02 * factor)
        for g in muon.param_groups:
            g["lr"] = 0.02 * factor
        for g in adamw.param_groups:
            g["lr"] = 0.004 * factor
        for model in (ours, ref):
            model(x, x).loss.backward()
        opt.step()
        muon.step()
        adamw.step()
        opt.zero_grad(set_to_none=True)
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
    changed = 0
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
        changed += not torch.equal(a, initial[name])
    assert changed == len(named)
    assert all("momentum_buffer" in opt.muon.state[named_p] for g in opt.muon.param_groups for named_p in g["params"])


def test_a_rule_giving_muon_a_non_matrix_or_leaving_a_parameter_out_is_an_error_naming_it():
    model = tiny_model(moe=True)
    with pytest.raises(OptimizerSetupError, match=r"train.optimizer: train.optimizer.rules\[0\] gives parameter "
                                                  r"'blocks.0.mlp.experts.up' \(shape \(4, 32, 64\)\) to Muon, which "
                                                  r"updates only 2-D matrices"):
        build_optimizer(optimizer({**MUON, "rules": [{"roles": ["expert"], "optimizer": "muon"}]}), model, 0.02, CPU)
    with pytest.raises(OptimizerSetupError, match=r"parameter 'blocks.0.norm1.weight' \(shape \(32,\)\) matches no "
                                                  r"rule that sets its optimizer"):
        build_optimizer(optimizer({**MUON, "default_rules": False, "rules": [{"roles": ["matrix"],
                                                                              "optimizer": "muon"}]}),
                        model, 0.02, CPU)
    with pytest.raises(OptimizerSetupError, match=r"train.optimizer.rules\[1\] \(names \['blocks.9.\*'\]\) matches "
                                                  r"no parameter"):
        build_optimizer(optimizer({**MUON, "rules": [{"roles": ["head"], "lr": 1e-3}, {"names": ["blocks.9.*"],
                                                                                         "lr": 1e-3}]}),
                        tiny_model(tie=False), 0.02, CPU)
    with pytest.raises(OptimizerSetupError, match="the rules give no parameter to Muon; use train.optimizer.kind: "
                                                  "adamw"):
        build_optimizer(optimizer({**MUON, "rules": [{"roles": ["matrix"], "optimizer": "adamw"}]}), model, 0.02, CPU)


@pytest.mark.parametrize("optimizer_block,tie,message", [
    ({"kind": "muon", "rules": [{"roles": ["norm", "not_matrix"], "optimizer": "muon"}]}, True,
     r"train.optimizer.rules\[0\].optimizer \(line \d+\): torch.optim.Muon updates only 2-D matrices"),
    ({"kind": "muon", "rules": [{"roles": ["head"], "lr": 0.001}]}, True,
     r"train.optimizer.rules\[0\].roles \(line \d+\): the head is tied to the token embedding"),
    ({"kind": "adamw", "rules": [{"roles": ["matrix"], "optimizer": "muon"}]}, False,
     r"train.optimizer.rules\[0\].optimizer \(line \d+\): 'muon' needs train.optimizer.kind: muon"),
    ({"kind": "muon", "rules": [{"lr": 0.001}]}, False,
     r"train.optimizer.rules\[0\] \(line \d+\): a rule needs roles or names"),
    ({"kind": "muon", "rules": [{"roles": ["heads"], "lr": 0.001}]}, False, r"train.optimizer.rules\[0\].roles\[0\]"),
])
def test_bad_rules_are_blueprint_errors(tmp_path, optimizer_block, tie, message):
    raw = tiny_raw(tmp_path)
    raw["model"]["tie_embeddings"] = tie
    raw["train"]["optimizer"] = optimizer_block
    with pytest.raises(BlueprintError, match=message):
        load_blueprint(write_blueprint(tmp_path, raw))


def resumes_bit_for_bit(tmp_path, train: dict):
    """Train 6 steps straight and 3 + 3 with a checkpoint between (Muon's momentum buffers in it): the same
    losses and weights. Returns the checkpoint."""
    straight = make_trainer(tmp_path, moe=True, **train)
    losses = [straight.step().loss.item() for _ in range(6)]
    first = make_trainer(tmp_path, moe=True, **train)
    assert [first.step().loss.item() for _ in range(3)] == losses[:3]
    state = first.state_dict()
    muon_ids = {i for g in state["optimizer"]["param_groups"] if g["optimizer"] == "muon" for i in g["params"]}
    assert muon_ids and all("momentum_buffer" in state["optimizer"]["state"][i] for i in muon_ids)
    ckpt = save_checkpoint(tmp_path / "ckpt" / "step_000003", first.model, state)
    torch.manual_seed(999)
    resumed = make_trainer(tmp_path, moe=True, model_seed=123, **train)
    load_model_weights(resumed.model, ckpt)
    resumed.load_state_dict(load_state(ckpt))
    assert [resumed.step().loss.item() for _ in range(3)] == losses[3:]
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    return ckpt, state


def test_resume_with_muon_state_is_bit_for_bit(tmp_path):
    ckpt, state = resumes_bit_for_bit(tmp_path, {"lr": 0.02, "optimizer": MUON})
    adamw_trainer = make_trainer(tmp_path, moe=True, lr=0.02)             # the state of another optimizer
    with pytest.raises(StateMismatch):
        adamw_trainer.load_state_dict(load_state(ckpt))
    regrouped = make_trainer(tmp_path, moe=True, lr=0.02, optimizer={**MUON, "rules": [   # same order, 2 groups
        {"names": ["blocks.1.mlp.router.weight"], "weight_decay": 0.0}]})
    assert regrouped.state_dict()["optimizer_params"] == state["optimizer_params"]
    with pytest.raises(StateMismatch, match=r"cannot restore the optimizer state: the saved optimizer groups are "
                                            r"\['muon', 'adamw', 'adamw'\], this optimizer has \['muon', 'muon'"):
        regrouped.load_state_dict(load_state(ckpt))


def test_tiny_blueprint_trains_30_steps_with_muon_and_the_loss_falls(tmp_path):
    raw = copy.deepcopy(tiny_raw(tmp_path))
    raw["train"].update(steps=30, eval_every=0, checkpoint_every=0, log_every=1, lr=0.02, optimizer=MUON)
    raw["sample"]["max_new_tokens"] = 2
    run = train_tiny(tmp_path, raw=raw)
    losses = [r["loss"] for r in read_rows(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


FSDP_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from nanodecoder.cli.catalog import catalog
from nanodecoder.config.declare import build_choice
from nanodecoder.model import build_model, build_model_spec
from nanodecoder.train import build_optimizer
from nanodecoder.train.optim import OptimizerSetupError
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
model = build_model(build_model_spec({{"context_length": 8, "d_model": 16, "n_layers": 1,
    "block": {{"attention": {{"kind": "causal", "n_heads": 2}}, "mlp": {{"kind": "gelu"}}}}}}, 64))
fully_shard(model)
try:
    build_optimizer(build_choice(catalog(), "optimizer", {{"kind": "muon"}}, None, {{}}), model, 0.02,
                    torch.device("cpu"))
except OptimizerSetupError as e:
    print("REFUSED", e)
build_optimizer(build_choice(catalog(), "optimizer", {{"kind": "adamw"}}, None, {{}}), model, 0.02,
                torch.device("cpu"))
print("ADAMW OK")
dist.destroy_process_group()
"""


def test_muon_refuses_fsdp_sharded_parameters(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT.format(port=port)], capture_output=True, text=True,
                         env=subprocess_env(tmp_path), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "REFUSED train.optimizer.kind: muon cannot update parameters sharded by FSDP" in out.stdout
    assert "--profile multi_gpu_compile" in out.stdout and "ADAMW OK" in out.stdout


def test_a_rule_that_matches_nothing_stops_the_run_with_one_line_before_any_run_folder(tmp_path, capsys):
    from nanodecoder.cli.run import main
    raw = tiny_raw(tmp_path)
    raw["train"]["optimizer"] = {"kind": "muon", "rules": [{"names": ["blocks.*.mlp.router.weight"],
                                                            "optimizer": "adamw"}]}
    assert main([str(write_blueprint(tmp_path, raw))]) == 2                      # a dense model has no router
    err = capsys.readouterr().err
    assert "error: train.optimizer.rules[0] (names ['blocks.*.mlp.router.weight']) matches no parameter" in err
    assert not (tmp_path / "runs").exists()
