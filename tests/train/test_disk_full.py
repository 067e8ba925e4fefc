"""A disk that fills up while a checkpoint is written: one clear error (no traceback, exit 2) that says so,
the partial write removed, the previous checkpoint intact as ``latest``, and ``--resume`` finishes the run
once there is space again.  Two ways torch reports it: an ``OSError`` with ENOSPC (safetensors, our own
files), and a bare ``RuntimeError`` from torch.save inside torch.distributed.checkpoint ("unexpected pos"),
which only the free space left tells apart from other failures."""
from __future__ import annotations

import errno
from collections import namedtuple

import pytest

from trainhelpers import run_dirs, write_blueprint
from nanodecoder.cli.run import main
from nanodecoder.runtime import sharded
from nanodecoder.train import checkpoint

Usage = namedtuple("Usage", "total used free")


def _full_disk_at_step(monkeypatch, fmt: str, step: int) -> None:
    """The write of ``step``'s checkpoint leaves a partial file and fails as a full disk does."""
    if fmt == "full":
        real = checkpoint._write_state

        def write_state(tmp, state):
            if state["step"] == step:
                (tmp / "partial.bin").write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
            real(tmp, state)
        monkeypatch.setattr(checkpoint, "_write_state", write_state)
    else:
        real_write, real_usage = sharded.write, checkpoint.shutil.disk_usage
        failing = {"on": False}

        def write(tensors, folder):
            if f"step_{step:06d}" in folder.parent.name:
                (folder / "__0_0.distcp").write_bytes(b"\0" * 4096)
                failing["on"] = True
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            real_write(tensors, folder)

        def usage(path):
            return Usage(10 ** 9, 10 ** 9 - 4096, 4096) if failing["on"] else real_usage(path)
        monkeypatch.setattr(sharded, "write", write)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_a_full_disk_mid_checkpoint_is_one_clear_error_and_the_run_resumes(tmp_path, monkeypatch, capsys, fmt):
    bp = write_blueprint(tmp_path, train={"checkpoint_format": fmt})
    with monkeypatch.context() as patch:
        _full_disk_at_step(patch, fmt, 8)
        assert main([str(bp)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "the disk is full" in line)
    assert "writing checkpoint step_000008" in line and "previous checkpoint (step_000004) is intact" in line
    assert "--resume" in line
    (run,) = run_dirs(tmp_path / "runs")
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_000004"
    assert not list(ckpt.glob(".tmp-*")) and not (ckpt / "step_000008").exists()   # the partial write is gone
    checkpoint.verify_checkpoint(ckpt / "step_000004")
    assert main(["--resume", str(run)]) == 0                                       # space again: it finishes
    assert (ckpt / "latest").read_text().strip() == "step_000008"
    checkpoint.verify_checkpoint(ckpt / "step_000008")


def test_other_write_failures_keep_their_own_error(tmp_path, monkeypatch):
    """Plenty of space and no ENOSPC: not called a full disk (the error is torch's own)."""
    error = checkpoint.disk_full_error(tmp_path, "step_000004", RuntimeError("something else"), "resume")
    assert error is None
    full = checkpoint.disk_full_error(tmp_path, "step_000004", OSError(errno.ENOSPC, "No space left on device"),
                                      "python -m nanodecoder.run --resume RUN")
    assert "the disk is full" in str(full) and "no earlier checkpoint exists" in str(full)
