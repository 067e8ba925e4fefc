"""A model whose fp32 weights + gradients + AdamW state do not fit one process's budget
(``NANODECODER_AVAILABLE_MEMORY``) trains, checkpoints and resumes under FSDP on 4 gloo processes: one process
refuses it before building anything (exit 4), 4 FSDP processes plan a quarter of it per rank and train, each
writing its own shard of the checkpoint (no rank gathers the model), and the run resumes on 4 processes.

Marked ``distributed``: the runs launch ``python -m torch.distributed.run --nproc_per_node=4`` (gloo).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from rthelpers import dense_raw, private_env, rows, run_dirs, subprocess_env, write
from nanodecoder.train.checkpoint import verify_checkpoint

pytestmark = pytest.mark.distributed
BUDGET = "40MiB"       # below the 43 MiB of weights + gradients + AdamW state of the model below


def test_a_model_beyond_one_process_trains_checkpoints_and_resumes_under_fsdp(tmp_path):
    raw = dense_raw(tmp_path)
    raw["model"].update({"d_model": 256, "n_layers": 4, "context_length": 16})
    raw["model"]["block"]["attention"]["n_heads"] = 4
    raw["train"].update({"steps": 4, "batch_size": 4, "grad_accum": 1, "eval_every": 2, "checkpoint_every": 2,
                         "eval_steps": 1})
    raw["sample"] = {"enabled": False}
    raw["logging"]["progress"] = False
    write(tmp_path, raw, "big.yaml")
    env = subprocess_env(tmp_path)
    env.update(private_env(tmp_path), NANODECODER_AVAILABLE_MEMORY=BUDGET)
    alone = subprocess.run([sys.executable, "-m", "nanodecoder.run", "big.yaml", "--profile", "cpu", "--dry-run"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert alone.returncode == 4, alone.stderr[-2000:]
    assert "the weights, gradients and optimizer state alone need" in alone.stderr, alone.stderr[-2000:]

    def launch(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "-m", "nanodecoder.run", *args]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    res = launch("big.yaml", "--profile", "cpu", "--set", "runtime.data_parallel=fsdp", "logging.runs_dir=runs")
    assert "fsdp rank 0/4" in res.stdout
    (run,) = run_dirs(tmp_path / "runs")
    manifest = verify_checkpoint(run / "ckpt" / "step_000004")
    assert manifest["format"] == "sharded"
    assert {f"__{r}_0.distcp" for r in range(4)} <= set(manifest["shards"])     # every rank wrote its own part
    launch("--resume", str(run), "--set", "train.steps=6")
    assert [r["step"] for r in rows(run, "train")] == [1, 2, 3, 4, 5, 6]
    verify_checkpoint(run / "ckpt" / "step_000006")
