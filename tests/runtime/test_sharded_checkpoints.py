"""Sharded checkpoints (``train.checkpoint_format: sharded``, torch.distributed.checkpoint): every rank writes only
its part, and the checkpoint reshards -- saved by 2 expert-parallel ranks (or 2 FSDP ranks), it resumes on 2
ranks with another layout and on 1 process with the uninterrupted run's losses; sampling and the readers take
its weights directly; the manifest hashes every shard.

Marked ``distributed``: the runs launch ``python -m torch.distributed.run --nproc_per_node=2`` (gloo).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from rthelpers import (assert_same_losses, moe_lb_raw, one_process, private_env, resume_copy, rows, run_dirs,
                       subprocess_env, torchrun, write)
from nanodecoder.train.checkpoint import CheckpointError, read_manifest, verify_checkpoint

pytestmark = pytest.mark.distributed
REL = 1e-5          # fp32; the reduction order differs between layouts, so not bit for bit


def _raw(tmp):
    raw = moe_lb_raw(tmp)
    raw["train"].update({"steps": 8, "eval_every": 4, "checkpoint_every": 4, "grad_clip": 0.05,
                         "keep_checkpoints": 3})
    raw["logging"]["progress"] = False
    return raw


def _numbers(run) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in rows(run) for k in ("loss", "val_loss") if k in r]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    write(tmp, _raw(tmp), "moe.yaml")
    return tmp


def _launch(tmp, runs: str, *extra: str, nproc: int = 2):
    res = torchrun(tmp, "-m", "nanodecoder.run", "moe.yaml", "--profile", "cpu", "--set", f"logging.runs_dir={runs}",
                   *extra, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = run_dirs(tmp / runs)
    return run


@pytest.fixture(scope="module")
def reference(tmp):
    """The uninterrupted run: 2 DDP processes, every expert on each, full checkpoints."""
    return _launch(tmp, "ddp", "--set", "runtime.expert_parallel=1")


@pytest.fixture(scope="module")
def ep_sharded(tmp):
    return _launch(tmp, "ep", "--set", "runtime.expert_parallel=2")     # auto: sharded


def test_an_expert_parallel_run_writes_sharded_checkpoints_with_its_losses(ep_sharded, reference):
    assert_same_losses(_numbers(ep_sharded), _numbers(reference), REL)
    ckpt = ep_sharded / "ckpt" / "step_000008"
    manifest = verify_checkpoint(ckpt)
    assert manifest["format"] == "sharded" and not (ckpt / "model.safetensors").exists()
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["shards"])   # each rank wrote its part
    state = json.loads((ckpt / "state.json").read_text())
    assert state["optimizer"]["sharded"] is True


@pytest.mark.parametrize("layout", ["ep2", "ddp2", "one"])
def test_a_sharded_checkpoint_resumes_on_another_layout(tmp, ep_sharded, reference, layout):
    run = resume_copy(tmp, ep_sharded, f"resume_{layout}")
    if layout == "one":
        one_process(tmp, "-m", "nanodecoder.run", "--resume", str(run), "--profile", "cpu",
                     "--set", "runtime.expert_parallel=1")
    else:
        res = torchrun(tmp, "-m", "nanodecoder.run", "--resume", str(run), "--set",
                       f"runtime.expert_parallel={2 if layout == 'ep2' else 1}")
        assert res.returncode == 0, res.stderr[-3000:]
    # steps 5..8 after the resume equal the uninterrupted run's
    assert_same_losses(_numbers(run), _numbers(reference), REL)


def test_readers_take_a_sharded_checkpoint_directly_and_consolidate_makes_a_full_one(tmp, ep_sharded, reference):
    from safetensors.torch import load_file
    from nanodecoder.train.checkpoint import read_full_shards
    full = read_full_shards(ep_sharded / "ckpt" / "step_000008", "model.")
    want = load_file(str(reference / "ckpt" / "step_000008" / "model.safetensors"))
    for k, t in want.items():
        assert torch.allclose(full[k], t, rtol=REL, atol=REL), k
    res = one_process(tmp, "-m", "nanodecoder.sample", str(ep_sharded), "--max-new-tokens", "8")
    assert res.stdout.strip()
    out = tmp / "consolidated"
    one_process(tmp, "-m", "nanodecoder.ckpt", "consolidate", str(ep_sharded), "--out", str(out))
    manifest = verify_checkpoint(out)
    assert manifest.get("format", "full") == "full"
    got = load_file(str(out / "model.safetensors"))
    ref_state = load_file(str(reference / "ckpt" / "step_000008" / "state.safetensors"))
    got_state = load_file(str(out / "state.safetensors"))
    assert got_state.keys() == ref_state.keys()
    for k in ref_state:
        if ref_state[k].is_floating_point():
            assert torch.allclose(got_state[k], ref_state[k], rtol=REL, atol=REL), k
    # every tensor of the full run's file (which keeps a tied weight once, the consolidated one under both names)
    assert want.keys() <= got.keys() and all(torch.allclose(got[k], want[k], rtol=REL, atol=REL) for k in want)


def test_fsdp_writes_sharded_checkpoints_that_one_process_resumes(tmp, reference):
    run = _launch(tmp, "fsdp", "--set", "runtime.expert_parallel=1", "runtime.data_parallel=fsdp")
    assert_same_losses(_numbers(run), _numbers(reference), REL)
    assert read_manifest(run / "ckpt" / "step_000008")["format"] == "sharded"
    resumed = resume_copy(tmp, run, "fsdp_one")
    one_process(tmp, "-m", "nanodecoder.run", "--resume", str(resumed), "--profile", "cpu")
    assert_same_losses(_numbers(resumed), _numbers(reference), REL)


def test_a_damaged_shard_is_refused_by_its_hash(tmp, ep_sharded):
    ckpt = tmp / "damaged"
    shutil.copytree(ep_sharded / "ckpt" / "step_000008", ckpt)
    shard = ckpt / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shards/__1_0.distcp has sha256"):
        verify_checkpoint(ckpt)
    (ckpt / "shards" / "__9_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="which its manifest does not list"):
        verify_checkpoint(ckpt)


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_which_resumes(tmp, reference):
    """Both ranks SIGKILLed while the step-8 checkpoint is half written (their shards on disk, the folder not yet
    sealed): ``latest`` still names step 4, which verifies and resumes (on one process) with the uninterrupted
    run's losses."""
    import os
    import signal
    import time
    from pathlib import Path

    from rthelpers import free_port
    env = subprocess_env(tmp)
    env.update(private_env(tmp), STALL_SHARDED_WRITE="2", STALL_MARK=str(tmp / "stalled"))
    script = Path(__file__).with_name("instrumented_run.py")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(script), "moe.yaml", "--profile", "cpu", "--set",
                             "logging.runs_dir=killed", "runtime.expert_parallel=2"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not all((tmp / f"stalled.{r}").exists() and (tmp / f"stalled.{r}").read_text() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second save"
            time.sleep(0.2)
    finally:
        for r in range(2):     # both ranks, SIGKILL: no cleanup runs (torchrun starts them in their own sessions)
            mark = tmp / f"stalled.{r}"
            if mark.exists() and mark.read_text():
                try:
                    os.kill(int(mark.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(timeout=120)                     # torchrun sees its workers die and exits
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    (run,) = run_dirs(tmp / "killed")
    ckpt = run / "ckpt"
    assert list(ckpt.glob(".tmp-step_000008-*")) and not (ckpt / "step_000008").exists()
    assert (ckpt / "latest").read_text().strip() == "step_000004"
    verify_checkpoint(ckpt / "step_000004")
    one_process(tmp, "-m", "nanodecoder.run", "--resume", str(run), "--profile", "cpu",
                 "--set", "runtime.expert_parallel=1")
    assert_same_losses(_numbers(run), _numbers(reference), REL)


def test_background_checkpoints_keep_the_losses_and_resume(tmp, reference):
    """``train.async_checkpoint``: 2 EP ranks write each sharded checkpoint in the background; the run's losses are
    the uninterrupted one's, both checkpoints verify, and the one of step 4 resumes on one process exactly."""
    run = _launch(tmp, "async", "--set", "runtime.expert_parallel=2", "train.async_checkpoint=true")
    assert_same_losses(_numbers(run), _numbers(reference), REL)
    for step in ("step_000004", "step_000008"):
        assert verify_checkpoint(run / "ckpt" / step)["format"] == "sharded"
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000008"
    resumed = resume_copy(tmp, run, "async_one")
    one_process(tmp, "-m", "nanodecoder.run", "--resume", str(resumed), "--profile", "cpu",
                 "--set", "runtime.expert_parallel=1")
    assert_same_losses(_numbers(resumed), _numbers(reference), REL)
