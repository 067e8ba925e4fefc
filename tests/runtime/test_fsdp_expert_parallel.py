"""Expert parallelism composed with FSDP2 (``runtime.expert_parallel: 2`` with ``runtime.data_parallel: fsdp`` on
4 processes: the experts split over 2 ranks and each split sharded over the 2 ranks holding it, everything else
sharded over all 4): the run gives the single process's losses, gradient norms, weights and optimizer state; its
sharded checkpoint resumes on 2 processes (EP 2 with FSDP, EP 2 with DDP) and on 1; a full checkpoint of one
process resumes under it and it writes full checkpoints equal to that process's; and writing its sharded
checkpoints gathers no floating-point tensor on any rank.

Marked ``distributed``: the runs launch ``python -m torch.distributed.run --nproc_per_node=4`` (gloo).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rthelpers import assert_same_losses, moe_lb_raw, one_process, resume_copy, rows, run_dirs, torchrun, write
from nanodecoder.train.checkpoint import read_full_shards, read_manifest, verify_checkpoint

pytestmark = pytest.mark.distributed
REL = 1e-5          # fp32; the reduction order differs between layouts, so not bit for bit
LAYOUT = ("--set", "runtime.expert_parallel=2", "runtime.data_parallel=fsdp")
WATCH = Path(__file__).with_name("instrumented_run.py")


def _numbers(run) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in rows(run) for k in ("loss", "val_loss", "grad_norm") if k in r]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """Tiny MoE, 4 experts, softmax top-2 with the batch load-balancing loss and z-loss (global over ranks),
    clipping at 0.05 (so the global norm matters), 2 accumulation micro-steps, global batch 4."""
    tmp = tmp_path_factory.mktemp("fsdp_ep")
    raw = moe_lb_raw(tmp)
    raw["train"].update({"steps": 8, "eval_every": 4, "checkpoint_every": 4, "grad_clip": 0.05,
                         "keep_checkpoints": 3})
    raw["logging"]["progress"] = False
    write(tmp, raw, "moe.yaml")
    return tmp


def _ok(res) -> subprocess.CompletedProcess:
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 0, "\n".join(errors[:20]) or res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def one(tmp):
    """The reference: one process, every expert, full checkpoints."""
    one_process(tmp, "-m", "nanodecoder.run", "moe.yaml", "--profile", "cpu", "--set", "logging.runs_dir=one")
    (run,) = run_dirs(tmp / "one")
    return run


@pytest.fixture(scope="module")
def fsdp_ep(tmp):
    """EP 2 x FSDP 2 on 4 processes (sharded checkpoints: the default), every rank's gathers during the saves
    recorded by instrumented_run.py."""
    res = _ok(torchrun(tmp, str(WATCH), "moe.yaml", "--profile", "cpu", "--set", "logging.runs_dir=fsdp_ep",
                       *LAYOUT, nproc=4, env_extra={"GATHER_WATCH": str(tmp / "gathers")}))
    (run,) = run_dirs(tmp / "fsdp_ep")
    return run, res


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert want.keys() <= got.keys(), (what, sorted(want.keys() - got.keys()))
    for k, t in want.items():
        assert got[k].shape == t.shape, (what, k)
        assert torch.allclose(got[k], t, rtol=REL, atol=REL), (what, k, (got[k] - t).abs().max())


def test_ep2_x_fsdp2_trains_as_one_process(tmp, fsdp_ep, one):
    run, res = fsdp_ep
    assert "fsdp rank 0/4, experts split: ep 2 x dp 2" in res.stdout
    assert re.search(r"memory +max RSS [\d,]+ MiB on rank \d of 4, [\d,]+ MiB of it since before the model was "
                     r"built; planned [\d,]+ MiB per process", res.stdout), res.stdout[-2000:]
    memory = json.loads((run / "run.json").read_text())["memory"]       # every rank's figures
    assert len(memory["peak_mib"]) == len(memory["model_mib"]) == 4 and memory["planned_mib"] > 0
    assert all(0 < added < peak for added, peak in zip(memory["model_mib"], memory["peak_mib"]))
    assert_same_losses(_numbers(run), _numbers(one), REL)        # train loss, global grad norm, val loss
    assert len(_numbers(run)) == 8 * 2 + 2
    last = "step_000008"
    assert read_manifest(run / "ckpt" / last)["format"] == "sharded"
    weights = read_full_shards(run / "ckpt" / last, "model.")
    want = load_file(str(one / "ckpt" / last / "model.safetensors"))
    _assert_close(weights, want, "weights after 8 steps")       # the expert gradients were the single process's
    out = tmp / "consolidated"
    one_process(tmp, "-m", "nanodecoder.ckpt", "consolidate", str(run), "--out", str(out))
    state = load_file(str(out / "state.safetensors"))
    want_state = load_file(str(one / "ckpt" / last / "state.safetensors"))
    assert state.keys() == want_state.keys()
    _assert_close(state, {k: v for k, v in want_state.items() if v.is_floating_point()}, "AdamW moments")


def test_writing_sharded_checkpoints_gathers_no_tensor(tmp, fsdp_ep):
    records = [json.loads((tmp / f"gathers.{r}").read_text()) for r in range(4)]
    assert all(r["saves"] == 2 for r in records), records            # steps 4 and 8
    assert [r["gathers"] for r in records] == [[], [], [], []], records
    shards = read_manifest(fsdp_ep[0] / "ckpt" / "step_000008")["shards"]
    assert {f"__{r}_0.distcp" for r in range(4)} <= set(shards)        # every rank wrote its own part


@pytest.mark.parametrize("layout", ["ep2_fsdp", "ep2_ddp", "one"])
def test_the_4_process_checkpoint_resumes_on_2_processes_and_on_1(tmp, fsdp_ep, one, layout):
    run = resume_copy(tmp, fsdp_ep[0], f"resume_{layout}")
    if layout == "one":
        one_process(tmp, "-m", "nanodecoder.run", "--resume", str(run), "--profile", "cpu",
                    "--set", "runtime.expert_parallel=1")
    else:
        fsdp = "fsdp" if layout == "ep2_fsdp" else "ddp"
        _ok(torchrun(tmp, "-m", "nanodecoder.run", "--resume", str(run), "--set", "runtime.expert_parallel=2",
                     f"runtime.data_parallel={fsdp}"))
    assert_same_losses(_numbers(run), _numbers(one), REL)           # steps 5..8 as the uninterrupted run's


def test_a_full_checkpoint_resumes_under_ep_x_fsdp_which_writes_full_ones(tmp, one):
    run = resume_copy(tmp, one, "full_resume")
    res = _ok(torchrun(tmp, "-m", "nanodecoder.run", "--resume", str(run), *LAYOUT,
                       "train.checkpoint_format=full", nproc=4))
    assert "experts split: ep 2 x dp 2" in res.stdout
    assert_same_losses(_numbers(run), _numbers(one), REL)
    ckpt = run / "ckpt" / "step_000008"
    assert verify_checkpoint(ckpt).get("format", "full") == "full"
    _assert_close(load_file(str(ckpt / "model.safetensors")),
                  load_file(str(one / "ckpt" / "step_000008" / "model.safetensors")), "full weights")
    got, want = (load_file(str(r / "ckpt" / "step_000008" / "state.safetensors")) for r in (run, one))
    _assert_close(got, {k: v for k, v in want.items() if v.is_floating_point()}, "full optimizer state")
