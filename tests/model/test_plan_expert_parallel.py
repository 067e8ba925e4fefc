"""The memory plan per rank under expert parallelism (``runtime.expert_parallel: N``): every MoE layer's routed
experts split over N ranks, everything else replicated (DDP) -- against parameters counted on the built model."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from nanodecoder.cli import param_count
from nanodecoder.cli import run as run_cli
from nanodecoder.components.moe import MoE
from nanodecoder.model import build_model
from nanodecoder.model import plan as P
from nanodecoder.model.spec import build_model_spec
from nanodecoder.runtime import MEMORY_ENV

#: a tiny MoE blueprint with shared experts (replicated under EP, like the router) and a dense first layer
MODEL = {"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 3, "tie_embeddings": False,
         "block": {"attention": {"kind": "causal", "n_heads": 2},
                   "mlp": {"kind": "moe", "n_experts": 8, "top_k": 2, "expert_hidden": 64, "n_shared_experts": 1}},
         "overrides": [{"layers": [0], "mlp": {"kind": "gelu", "hidden_size": 64}}]}
TORCHRUN_RANK0 = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def counted() -> tuple[int, int]:
    """``(routed expert parameters, all parameters)`` of the built model, counted by torch."""
    model = build_model(build_model_spec(MODEL))
    routed = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    return routed, sum(p.numel() for p in model.parameters())


def ep_plan(ep: int, world: int = 4, **setting) -> P.Plan:
    return P.plan(build_model_spec(MODEL), P.Setting(context=16, world_size=world, expert_parallel=ep, **setting))


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_each_rank_holds_its_share_of_the_experts_and_all_the_rest(ep):
    routed, total = counted()
    assert 0 < routed < total
    held = routed / ep + (total - routed)
    mem = ep_plan(ep).memory()
    assert mem.weights == mem.gradients == 4 * held
    assert mem.optimizer == 2 * 4 * held                         # AdamW: two fp32 states per parameter held
    assert ep_plan(ep).params_per_device == held


def test_expert_parallel_1_is_the_replicated_plan_unchanged():
    _, total = counted()
    one, alone = ep_plan(1).memory(), ep_plan(1, world=1).memory()
    assert one == alone and one.weights == 4 * total
    for ckpt in (False, True):              # activations are per rank's tokens either way (balanced routing)
        assert ep_plan(4).memory(ckpt).activations == ep_plan(1).memory(ckpt).activations


def test_autocast_copies_hold_the_local_experts_only():
    routed, _ = counted()
    full, split = (ep_plan(ep, precision="bf16").memory(False) for ep in (1, 4))
    assert full.weight_copies - split.weight_copies == 2 * routed * (1 - 1 / 4)


def test_fsdp_shards_the_rest_over_the_world_and_the_experts_over_at_least_ep():
    routed, total = counted()
    mem = ep_plan(2, sharded=True).memory()
    assert mem.weights == pytest.approx(4 * ((total - routed) / 4 + routed / 4))


def test_a_degree_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"runtime.expert_parallel: 3 must divide the number of processes \(6\)"):
        ep_plan(3, world=6)
    with pytest.raises(ValueError, match=r"must divide the number of processes \(2\)"):
        ep_plan(4, world=2)


def blueprint(tmp_path, ep: int) -> str:
    raw = {"name": "ep_fit", "model": MODEL, "train": {"steps": 2, "batch_size": 4},
           "logging": {"runs_dir": str(tmp_path / "runs"), "progress": False},
           "runtime": {"profile": "cpu", "expert_parallel": ep}}
    path = tmp_path / f"ep{ep}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_expert_parallelism_makes_a_run_fit_that_does_not_without_it(tmp_path, monkeypatch, capsys):
    """Rank 0 of a 4-process torchrun job: the dry run's plan and verdict are per rank."""
    for key, value in TORCHRUN_RANK0.items():
        monkeypatch.setenv(key, value)
    spec = build_model_spec(MODEL)
    setting = P.Setting(context=16, world_size=4, device="cpu")
    needs = {ep: P.plan(spec, dataclasses.replace(setting, expert_parallel=ep)).memory().total for ep in (1, 4)}
    assert needs[4] < needs[1]
    monkeypatch.setenv(MEMORY_ENV, str(int((needs[1] + needs[4]) / 2)))
    assert run_cli.main([blueprint(tmp_path, 1), "--dry-run"]) == 4
    out = capsys.readouterr().out
    assert "does not fit" in out and "would fit (--set runtime.expert_parallel=" in out
    assert run_cli.main([blueprint(tmp_path, 4), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "experts split over 4 devices" in out and "fits: " in out
    assert P.human_bytes(needs[4]) in out


def test_param_count_shows_every_expert_parallel_layout_of_the_processes(tmp_path, capsys):
    path = blueprint(tmp_path, 2)
    assert param_count.main([path, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "per device by runtime.expert_parallel on 4 processes" in out and "2 (this run)" in out
    assert param_count.main([path, "--world-size", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[path]
    routed, total = counted()
    by_ep = {row["expert_parallel"]: row["params_per_device"] for row in got["expert_parallel_layouts"]}
    assert by_ep == {ep: routed / ep + total - routed for ep in (1, 2, 4)}
    assert got["params_per_device"] == by_ep[2]
    assert param_count.main([path, "--world-size", "3"]) == 2
    assert "runtime.expert_parallel" in capsys.readouterr().err


def test_a_degree_that_divides_the_processes_but_not_the_experts_exits_2_before_training(tmp_path, monkeypatch,
                                                                                         capsys):
    """6 processes, EP 3, 8 experts: the dry run (and a real run, before building anything) exit 2 naming the
    key and the degrees that work."""
    for key, value in {**TORCHRUN_RANK0, "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "6"}.items():
        monkeypatch.setenv(key, value)
    assert run_cli.main([blueprint(tmp_path, 3), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("runtime.expert_parallel: 3 must divide the number of processes (6) and every MoE layer's n_experts (8); "
            "choose one of [1, 2]") in err
    assert "Traceback" not in err


def test_an_mtp_module_is_planned_as_one_more_block_not_as_part_of_the_root():
    """FSDP wraps the MTP module's block as a unit and expert parallelism splits its experts (the runtime finds
    every ``Block``), so its routed experts are spread like the layers' and never gathered whole with the root:
    the root only gains the module's projection and norms."""
    routed, total = counted()
    with_mtp = {**MODEL, "mtp": {"depth": 1}}
    model = build_model(build_model_spec(with_mtp))
    mtp_routed = sum(p.numel() for m in model.mtp.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    mtp_root = sum(p.numel() for n, p in model.mtp.named_parameters() if not n.startswith("0.block."))
    assert mtp_routed == routed // 2 and mtp_root == 2 * 32 * 32 + 3 * 2 * 32  # one MoE layer of two; proj, 3 LayerNorms
    setting = P.Setting(context=16, world_size=4, expert_parallel=2, sharded=True)
    plain, mtp = (P.plan(build_model_spec(m), setting) for m in (MODEL, with_mtp))
    assert mtp.routed_params == plain.routed_params + mtp_routed
    assert mtp.params_per_device == pytest.approx(
        (sum(p.numel() for p in model.parameters()) - routed - mtp_routed) / 4 + (routed + mtp_routed) / 4)
    assert mtp.memory().gathered - plain.memory().gathered == pytest.approx(4 * mtp_root)
