"""Checkpoint manifests are validated by their own schema; every tensor file in a checkpoint is verified; a
checkpoint that verifies nothing is invalid; weights-only checkpoints load but do not resume; resuming from an
older checkpoint sets the later ones aside instead of letting pruning mix them up."""
from __future__ import annotations

import json

import pytest
from torch import nn

from nanodecoder.train.checkpoint import (MANIFEST, MODEL_FILE, CheckpointError, CheckpointManager,
                                          load_model_weights, load_state, model_tensors, save_checkpoint,
                                          save_weights_only, verify_checkpoint)


@pytest.fixture
def ckpt(tmp_path):
    model = nn.Linear(3, 2)
    return save_checkpoint(tmp_path / "step_000004", model, {"step": 4}), model


def edit_manifest(path, change):
    m = json.loads((path / MANIFEST).read_text())
    change(m)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change,words", [
    (lambda m: m.pop("files"), "'files' is a required property"),
    (lambda m: m.update(files=["model.safetensors"]), "['files']: ['model.safetensors'] is not of type 'object'"),
    (lambda m: m.update(files={}), "should be non-empty"),
    (lambda m: m["files"].pop(MODEL_FILE), "does not list model.safetensors"),
    (lambda m: m["files"][MODEL_FILE].update(sha256="abc"), "does not match"),
    (lambda m: m.update(step="four"), "['step']: 'four' is not of type"),
], ids=["no_files", "files_list", "files_empty", "model_unlisted", "bad_hash", "bad_step"])
def test_a_malformed_manifest_is_a_clear_error(ckpt, change, words):
    path, model = ckpt
    edit_manifest(path, change)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(model, path)
    assert words in str(e.value) and "--checkpoint" in str(e.value)


def test_an_unlisted_tensor_file_is_refused(ckpt):
    path, model = ckpt
    (path / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.safetensors, which its manifest does not list"):
        verify_checkpoint(path)


def test_damaged_weights_are_named(ckpt):
    path, model = ckpt
    data = bytearray((path / MODEL_FILE).read_bytes())
    data[-1] ^= 1
    (path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors has sha256"):
        load_model_weights(model, path)


def test_weights_only_checkpoints_load_but_do_not_resume(tmp_path):
    model = nn.Linear(3, 2)
    path = save_weights_only(tmp_path / "imported", *model_tensors(model), source="an HF import")
    fresh = nn.Linear(3, 2)
    load_model_weights(fresh, path)
    assert all((a == b).all() for a, b in zip(model.parameters(), fresh.parameters()))
    with pytest.raises(CheckpointError, match="weights only .an HF import.*finetune"):
        load_state(path)


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    model = nn.Linear(3, 2)
    mgr = CheckpointManager(tmp_path / "ckpt", keep=5)
    for step in (2, 4, 6):
        mgr.save(step, model, {"step": step}, best=step == 6)
    moved = mgr.set_aside_after(mgr.resolve("step_000002"))
    assert moved == ["step_000004", "step_000006"]
    assert mgr.latest().name == "step_000002" and mgr.best() is None
    assert [p.name for p in mgr.complete()] == ["step_000002"]
    assert (tmp_path / "ckpt" / "superseded" / "step_000006" / MANIFEST).is_file()
