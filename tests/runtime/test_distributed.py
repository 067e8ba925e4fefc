"""DDP and FSDP2 over torchrun on the CPU (gloo): the same losses as one process with the same
global batch, rank 0 alone writes, checkpoints move between sharded and single-process runs,
MoE balancing biases stay identical on every rank, a failing rank ends the job.

Marked ``distributed``: each test launches ``python -m torch.distributed.run --nproc_per_node=2``.
"""
from __future__ import annotations

import json

import pytest

from rthelpers import REPO, assert_same_losses, losses, rows, run_dirs, torchrun, train_in_process

pytestmark = pytest.mark.distributed
REL = 1e-5


def test_ddp_dense_matches_one_process_and_only_rank_0_writes(workdir, reference):
    res = torchrun(workdir, "-m", "nanodecoder.run", "dense.yaml", "--set", "logging.runs_dir=ddp_dense")
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = run_dirs(workdir / "ddp_dense")          # one run folder, written by rank 0
    assert_same_losses(losses(run), losses(reference["dense"]), REL)   # grad_accum 2: sync on the last
    assert res.stdout.count("== nanodecoder run: tiny ==") == 1       # one start summary
    assert "batch          4 (2 per rank x 2 ranks) x 16 tokens x 2 accum = 128 tokens/step" in res.stdout
    assert "ddp rank 0/2" in res.stdout
    assert len(rows(run, "train")) == len(rows(reference["dense"], "train"))     # no duplicated rows
    assert sorted(p.name for p in (run / "ckpt").glob("step_*")) == ["step_000005", "step_000010"]
    assert (run / "samples.txt").read_text() == (reference["dense"] / "samples.txt").read_text()


def test_ddp_moe_keeps_balancing_biases_identical_on_every_rank(workdir, reference):
    out = workdir / "ddp_moe.json"
    res = torchrun(workdir, str(REPO / "tests" / "runtime" / "dist_worker.py"), "train", "moe.yaml", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    want = [r["loss"] for r in rows(reference["moe"], "train")]
    assert max(abs(a - b) / b for a, b in zip(got["losses"], want)) <= REL
    assert got["expert_bias"] and any(abs(v) > 0 for layer in got["expert_bias"] for v in layer)
    assert all(got["buffers_identical"].values()), got["buffers_identical"]
    assert all(got["params_identical"].values())
    assert "ddp rank 0/2" in got["describe"]


def test_ddp_moe_with_a_load_balancing_loss_matches_one_process(workdir, reference):
    """The batch lb loss is a non-linear function of the whole batch: ranks all-reduce f and P."""
    res = torchrun(workdir, "-m", "nanodecoder.run", "moe_lb.yaml", "--set", "logging.runs_dir=ddp_moe_lb")
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = run_dirs(workdir / "ddp_moe_lb")
    ref = reference["moe_lb"]
    assert_same_losses(losses(run), losses(ref), REL)
    got, want = rows(run, "train"), rows(ref, "train")
    lb = [k for k in want[0] if k.endswith("lb_loss")]
    assert lb and all(r[k] > 0 for r in want for k in lb)
    for a, b in zip(got, want):                       # the logged aux values are the global ones too
        for k in lb:
            assert abs(a[k] - b[k]) <= REL * b[k], (k, a[k], b[k])


def test_fsdp_moe_matches_one_process_and_its_checkpoint_resumes_in_one_process(workdir, reference):
    res = torchrun(workdir, "-m", "nanodecoder.run", "moe.yaml", "--profile", "fsdp", "--set", "runtime.device=cpu",
                   "runtime.precision=fp32", "train.steps=5", "logging.runs_dir=fsdp_moe")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fsdp rank 0/2" in res.stdout
    (run,) = run_dirs(workdir / "fsdp_moe")
    ref = losses(reference["moe"])
    assert_same_losses(losses(run), [r for r in ref if r[0] <= 5], REL)
    # the FSDP run's checkpoint is sharded (the default for FSDP): one process continues it exactly
    from nanodecoder.cli.run import main
    assert main(["--resume", str(run), "--profile", "cpu", "--set", "train.steps=10"]) == 0
    assert_same_losses(losses(run), ref, REL)
    from safetensors.torch import load_file
    a = load_file(str(run / "ckpt" / "step_000010" / "model.safetensors"))
    b = load_file(str(reference["moe"] / "ckpt" / "step_000010" / "model.safetensors"))
    assert a.keys() == b.keys()                          # the tied head is stored once, as in one process


def test_a_single_process_checkpoint_resumes_under_ddp(workdir, reference, tmp_path):
    run = train_in_process(workdir / "dense.yaml", tmp_path / "runs", "--set", "train.steps=5")
    res = torchrun(workdir, "-m", "nanodecoder.run", "--resume", str(run), "--set", "train.steps=10")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_losses(losses(run), losses(reference["dense"]), REL)


def test_a_failing_rank_ends_the_job_with_its_error(workdir):
    res = torchrun(workdir, str(REPO / "tests" / "runtime" / "dist_worker.py"), "fail", "dense.yaml", "x.json",
                   timeout=120)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr


def test_sigterm_stops_every_rank_at_the_same_step_with_a_checkpoint(workdir):
    import signal
    import subprocess
    import sys
    import time
    from rthelpers import free_port, private_env, subprocess_env
    env = {**subprocess_env(workdir), **private_env(workdir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "nanodecoder.run", "dense.yaml", "--set", "train.steps=100000", "train.log_every=20",
           "train.eval_every=0", "train.checkpoint_every=0", "logging.runs_dir=sigterm"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(workdir.glob("sigterm/*/*/metrics.jsonl")):
            time.sleep(0.5)
        while time.monotonic() < deadline and len(rows(run_dirs(workdir / "sigterm")[0])) < 2:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)        # torchrun forwards it to both ranks
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    (run,) = run_dirs(workdir / "sigterm")
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted" and 0 < meta["step"] < 100000
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{meta['step']:06d}"
    assert out.count("== interrupted at step") == 1
