"""Faults under torchrun (issue 27): one rank killed with SIGKILL mid-run ends the whole job promptly with one
line naming the lost rank, leaves the last complete checkpoint intact, and ``--resume`` continues from it with
another number of processes.

Marked ``distributed``: the run launches ``python -m torch.distributed.run --nproc_per_node=2`` (gloo).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rthelpers import dense_raw, free_port, private_env, rows, run_dirs, subprocess_env, write

pytestmark = pytest.mark.distributed
TIMEOUT_S = 20           # runtime.timeout_s of the killed job
STEPS = 100_000          # far more than it trains before the kill


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (read from /proc: no psutil)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass       # the process ended meanwhile
    return out


def _rank_of(pid: int) -> str | None:
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    return env.get(b"RANK", b"").decode() or None


def _ranks(torchrun_pid: int) -> dict[str, int] | None:
    """``{RANK: pid}`` of the two workers torchrun started (None until both are there)."""
    ranks = {_rank_of(pid): pid for pid in _children(torchrun_pid)}
    return ranks if len(ranks) == 2 else None


def _wait_for(what, seconds: float, proc: subprocess.Popen):
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_rank_ends_the_job_and_resume_continues_on_one_process(tmp_path, monkeypatch):
    raw = dense_raw(tmp_path)
    raw["logging"]["progress"] = False
    raw["train"].update({"steps": STEPS, "grad_accum": 1, "checkpoint_every": 10, "eval_every": STEPS})
    write(tmp_path, raw, "bp.yaml")
    env = subprocess_env(tmp_path)
    env.update(private_env(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "nanodecoder.run", "bp.yaml", "--set", f"runtime.timeout_s={TIMEOUT_S}",
           "--set", f"logging.runs_dir={tmp_path / 'runs'}"]
    err = tmp_path / "stderr.txt"
    with err.open("w") as err_file:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
        try:
            ckpt = _wait_for(lambda: list((tmp_path / "runs").glob("*/*/ckpt/latest")), 180, proc)
            assert ckpt, f"no checkpoint before the kill: {err.read_text()[-3000:]}"
            ranks = _wait_for(lambda: _ranks(proc.pid), 10, proc)
            assert ranks and set(ranks) == {"0", "1"}, ranks
            os.kill(ranks["1"], signal.SIGKILL)
            killed = time.monotonic()
            proc.wait(timeout=TIMEOUT_S + 60)          # hangs past this fail the test
            took = time.monotonic() - killed
        finally:
            _stop(proc)
    text = err.read_text()
    assert proc.returncode != 0 and took <= TIMEOUT_S + 60, (proc.returncode, took)
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 was lost (its connection"), text[-3000:]
    assert "(seen by rank 0); the job ends" in lines[0] and "--resume" in lines[0], lines
    assert "nanodecoder/" not in text, text[-3000:]            # no traceback of ours (torchrun prints its own)

    from nanodecoder.train.checkpoint import verify_checkpoint
    from nanodecoder.train.rundir import RunDir
    (run,) = run_dirs(tmp_path / "runs")
    manager = RunDir(run).checkpoints
    latest = manager.latest()
    assert latest is not None and latest.name in lines[0]
    for folder in manager.complete():                # what a reader or --resume may take is complete
        verify_checkpoint(folder)
    step = int(latest.name.split("_")[1])
    assert step >= 10 and step % 10 == 0

    from nanodecoder.cli.run import main
    for key, value in private_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["--resume", str(run), "--set", f"train.steps={step + 3}"]) == 0     # one process, no torchrun
    steps = [r["step"] for r in rows(run, "train")]
    assert steps == list(range(1, step + 4)), steps       # rows past the checkpoint were dropped, then continued
    assert manager.latest().name == f"step_{step + 3:06d}"
    verify_checkpoint(manager.latest())


@pytest.mark.parametrize("text, rank, world, want", [
    ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46257", 0, 2,
     "rank 1 of 2 was lost (its connection closed)"),
    ("[pair.cc:598] Read error [127.0.0.1]:41193: Connection reset by peer", 1, 2,
     "rank 0 of 2 was lost (its connection reset)"),
    ("Timed out waiting 5000ms for recv operation to complete", 0, 2,
     "rank 1 of 2 was lost (it did not answer within runtime.timeout_s)"),
    ("[Rank 2] Watchdog caught collective operation timeout: rank 3 did not answer", 2, 4,
     "rank 3 of 4 was lost (it did not answer within runtime.timeout_s)"),
    ("Connection closed by peer [10.0.0.7]:29500", 0, 8, "another rank of 8 was lost (its connection closed)"),
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)", 0, 2, None),
])
def test_lost_peer_names_the_rank_as_far_as_the_error_tells(text, rank, world, want):
    from nanodecoder.runtime.distributed import lost_peer
    assert lost_peer(RuntimeError(text), rank, world) == want
    assert lost_peer(ValueError(text), rank, world) is None
