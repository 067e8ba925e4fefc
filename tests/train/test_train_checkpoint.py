"""Checkpoint files: safetensors + JSON, hashes, atomic writes, pruning, clear errors, kill -9 safety."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nanodecoder.train.checkpoint import (MANIFEST, MODEL_FILE, STATE_JSON, CheckpointError, CheckpointManager,
                                          clean_name, load_model_weights, load_state, model_tensors,
                                          save_checkpoint, verify_checkpoint)
from nanodecoder.train.state_io import flatten, unflatten
from trainhelpers import REPO, subprocess_env


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.wte = nn.Embedding(10, width)
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.wte.weight
        self.register_buffer("bias_buf", torch.arange(3.0))


class Wrapped(nn.Module):
    """Stands in for torch.compile (``_orig_mod``) + DDP (``module``) wrappers."""

    def __init__(self, inner):
        super().__init__()
        self.module = nn.Module()
        self.module._orig_mod = inner


def state_example():
    opt_model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(opt_model.parameters(), lr=0.1)
    opt_model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"step": 7, "optimizer": opt.state_dict(), "names": ["a", "b"], "best": float("inf"),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "sampler": {"batches": 12, "nested": (1, [2.5, None], {"x": np.int64(3)})}}


def test_state_roundtrip_is_exact_without_pickle():
    state = state_example()
    doc, tensors = flatten(state)
    back = unflatten(json.loads(json.dumps(doc)), tensors)
    assert back["step"] == 7 and back["best"] == float("inf")
    assert back["sampler"]["nested"] == (1, [2.5, None], {"x": 3})
    assert set(back["optimizer"]["state"]) == {0, 1}                     # int keys survive JSON
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])
    torch.set_rng_state(back["rng"]["torch"])
    with pytest.raises(TypeError, match="cannot store a object"):
        flatten({"bad": object()})


def test_tied_weights_saved_once_and_names_uncompiled(tmp_path):
    net = Net()
    tensors, aliases = model_tensors(Wrapped(net))
    assert "wte.weight" in tensors and "head.weight" not in tensors
    assert aliases == {"head.weight": "wte.weight"}
    assert not any("_orig_mod" in n or n.startswith("module.") for n in tensors)
    assert clean_name("module._orig_mod.blocks.0.attn.weight") == "blocks.0.attn.weight"
    path = save_checkpoint(tmp_path / "step_000001", Wrapped(net), {"step": 1})
    fresh = Net()
    load_model_weights(fresh, path)
    assert fresh.head.weight is fresh.wte.weight
    for (n, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n


def test_manifest_hashes_detect_corruption(tmp_path):
    path = save_checkpoint(tmp_path / "step_000002", Net(), state_example())
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.safetensors", "state.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["step"] == 7
    assert load_state(path)["sampler"]["batches"] == 12
    good = (path / MODEL_FILE).read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF
    (path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: model.safetensors has sha256"):
        load_model_weights(Net(), path)
    (path / MODEL_FILE).write_bytes(good)
    (path / STATE_JSON).unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        verify_checkpoint(path)


def test_architecture_mismatch_is_explained(tmp_path):
    path = save_checkpoint(tmp_path / "step_000003", Net(width=4), {"step": 3})
    with pytest.raises(CheckpointError, match=r"does not match this model's architecture:\n.*shape mismatch: .*"
                                              r"lin.bias: checkpoint \(4,\) vs model \(8,\)"):
        load_model_weights(Net(width=8), path)

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.more = nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="missing in checkpoint: more.bias, more.weight"):
        load_model_weights(Extra(), path)


def test_manager_pointers_pruning_and_stale_temp_dirs(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    net = Net()
    mgr.save(1, net, {"step": 1}, best=True)
    for step in (2, 3, 4):
        mgr.save(step, net, {"step": step})
    assert [p.name for p in mgr.complete()] == ["step_000001", "step_000003", "step_000004"]  # best kept
    assert mgr.latest().name == "step_000004" and mgr.best().name == "step_000001"
    assert mgr.resolve("step_000003").name == "step_000003"
    with pytest.raises(CheckpointError, match="no 'step_000002' checkpoint.*complete checkpoints: step_000001"):
        mgr.resolve("step_000002")
    # a write that died half way: a temp folder, never pointed to, ignored and cleaned by the next save
    partial = mgr.root / ".tmp-step_000005-999"
    partial.mkdir()
    (partial / MODEL_FILE).write_bytes(b"half")
    assert mgr.latest().name == "step_000004"
    load_model_weights(Net(), mgr.resolve("latest"))
    mgr.save(5, net, {"step": 5})
    assert not partial.exists() and mgr.latest().name == "step_000005"


KILL_SCRIPT = r"""
import os, sys
from pathlib import Path
import torch
import nanodecoder.train.checkpoint as ck
root = Path(sys.argv[1])
net = torch.nn.Linear(64, 64)
mgr = ck.CheckpointManager(root, keep=3)
mgr.save(1, net, {"step": 1})
real_fsync = ck._fsync
def blocking_fsync(path):
    real_fsync(path)
    if Path(path).name == "model.safetensors":
        print("WRITING", flush=True)
        sys.stdin.readline()          # wait here, mid-write, until killed
ck._fsync = blocking_fsync
with torch.no_grad():
    net.weight.add_(1.0)
mgr.save(2, net, {"step": 2})
print("FINISHED", flush=True)
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(tmp_path), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.kill()                                   # SIGKILL: no cleanup runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(root.glob(".tmp-step_000002-*"))     # the half-written checkpoint
    mgr = CheckpointManager(root)
    assert mgr.latest().name == "step_000001"
    net = nn.Linear(64, 64)
    load_model_weights(net, mgr.resolve("latest"))
    assert load_state(mgr.resolve("latest"))["step"] == 1


def test_a_background_save_is_sealed_only_once_its_shards_are_written(tmp_path):
    """``train.async_checkpoint``: ``save_sharded`` returns while the shards are still being written, ``latest``
    moves only when the pending save is finished, and the shards hold the tensors as they were at the save even
    though training changed them meanwhile (DCP's async_save copies them first)."""
    from nanodecoder.runtime import sharded
    from nanodecoder.train.checkpoint import PendingSave, read_full_shards, verify_checkpoint
    mgr = CheckpointManager(tmp_path / "ckpt", keep=3)
    weight = torch.ones(8, 8)
    waited = []

    def background(tensors, folder):
        wait = sharded.write_in_background(tensors, folder)
        return lambda: waited.append(folder) or wait()
    pending = mgr.save_sharded(1, {"step": 1}, {"model.w": weight}, main=True, agree=lambda s: s,
                               background=background)
    assert isinstance(pending, PendingSave) and mgr.latest() is None and not waited
    weight.mul_(3.0)                                   # the next optimizer step
    path = pending.finish()
    assert waited and mgr.latest() == path and path.name == "step_000001"
    verify_checkpoint(path)
    assert torch.equal(read_full_shards(path, "model.")["w"], torch.ones(8, 8))


def test_background_checkpoints_need_the_sharded_format(tmp_path, capsys):
    from nanodecoder.cli.run import main
    from trainhelpers import write_blueprint
    bp = write_blueprint(tmp_path)
    assert main([str(bp), "--dry-run", "--set", "train.async_checkpoint=true", "train.checkpoint_format=full"]) == 2
    err = capsys.readouterr().err
    assert ("train.async_checkpoint: true writes sharded checkpoints in the background, and "
            "train.checkpoint_format is full; set train.checkpoint_format: sharded (or auto)") in err, err
    assert main([str(bp), "--dry-run", "--set", "train.async_checkpoint=true"]) == 0   # auto: full ones, as usual
