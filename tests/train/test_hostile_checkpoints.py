"""Hostile run folders: checkpoint pointers, manifests and links that lead out of the run, and safetensors
files that lie about their size.  ``python -m nanodecoder.sample RUN`` and ``--resume RUN`` end in one line
(exit 2) that names the file, and nothing outside the run folder is read: every case below points at a
complete, valid checkpoint outside, which would load if the link or name were followed."""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct

import pytest
from safetensors.torch import save_file
from torch import nn

from nanodecoder.cli.run import main as run_main
from nanodecoder.cli.sample import main as sample_main
from nanodecoder.data.download import sha256_of
from nanodecoder.train.checkpoint import (MANIFEST, MODEL_FILE, STATE_FILE, CheckpointError, CheckpointManager,
                                          load_model_weights)

STEP = "step_000008"


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared tiny run (checkpoints step_000004 and step_000008) and, beside it, a copy of its
    newest checkpoint outside the run folder."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    shutil.copytree(trained_run / "ckpt" / STEP, tmp_path / "outside" / STEP)
    (tmp_path / "outside" / "pointer").write_text(STEP)
    return copy


def fails(capsys, command: str, run_dir, *extra) -> str:
    capsys.readouterr()
    if command == "sample":
        code = sample_main([str(run_dir), "--max-new-tokens", "2", *extra])
    else:
        code = run_main(["--resume", str(run_dir), "--set", "train.steps=9", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def relink(path, target) -> None:
    """Replace the file or folder ``path`` by a symbolic link to ``target``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def reseal(folder, name) -> None:
    """Update the manifest's size and sha256 of ``name``, as a forger would."""
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name] = {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(m))


COMMANDS = ["sample", "resume"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_pointer_naming_a_folder_outside_the_run_is_refused(run, capsys, command, how):
    outside = run.parent / "outside" / STEP
    for pointer in ("latest", "best"):
        (run / "ckpt" / pointer).write_text("../../outside/" + STEP if how == "relative" else str(outside))
    err = fails(capsys, command, run)
    assert f"{run / 'ckpt'}/" in err and "should hold the name of a checkpoint folder" in err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("target", ["pointer", "/etc/passwd"])
def test_a_pointer_that_links_out_of_the_run_is_refused(run, capsys, command, target):
    outside = run.parent / "outside" / "pointer" if target == "pointer" else target
    for pointer in ("latest", "best"):
        relink(run / "ckpt" / pointer, outside)
    err = fails(capsys, command, run)
    assert f"leads to {outside}, outside {run / 'ckpt'}" in err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("link", [STEP, f"{STEP}/{MODEL_FILE}", f"{STEP}/{MANIFEST}", f"{STEP}/{STATE_FILE}"])
def test_a_link_inside_ckpt_that_leaves_the_run_is_refused(run, capsys, command, link):
    relink(run / "ckpt" / link, run.parent / "outside" / link)
    err = fails(capsys, command, run)                # sampling verifies the state file too, as the manifest lists it
    assert f"leads to {run.parent / 'outside' / link}, outside" in err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["../outside/" + STEP, "absolute", "step_000004/../../../outside/" + STEP])
def test_a_checkpoint_name_outside_the_run_is_refused(run, capsys, command, name):
    name = str(run.parent / "outside" / STEP) if name == "absolute" else name
    err = fails(capsys, command, run, "--checkpoint", name)
    assert "outside" in err and str(run / "ckpt") in err


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "../model.safetensors"])
def test_a_manifest_listing_a_name_that_is_not_a_file_of_the_folder_is_refused(run, capsys, name):
    folder = run / "ckpt" / STEP
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name] = m["files"][MODEL_FILE]
    (folder / MANIFEST).write_text(json.dumps(m))
    err = fails(capsys, "sample", run)
    assert f"{folder / MANIFEST} is not a valid checkpoint manifest: ['files']: {name!r} does not match" in err


def test_an_oversized_manifest_or_pointer_is_refused_without_reading_it(run, capsys):
    with open(run / "ckpt" / "latest", "w") as f:
        f.write(STEP + " " * (1 << 20))
    (run / "ckpt" / "best").unlink()
    assert "should hold the name of a checkpoint folder" in fails(capsys, "sample", run)
    (run / "ckpt" / "latest").write_text(STEP)
    with open(run / "ckpt" / STEP / MANIFEST, "a") as f:
        f.write(" " * (2 << 20))
    assert "manifest.json is corrupt: 2," in fails(capsys, "sample", run)


def lying_header(f, shape) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE])
@pytest.mark.parametrize("how", ["huge_shape", "truncated"])
def test_a_lying_or_truncated_safetensors_file_is_one_line(run, capsys, command, name, how):
    folder = run / "ckpt" / STEP
    if how == "huge_shape":
        lying_header(folder / name, [2 ** 40])
    else:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    reseal(folder, name)                       # the manifest agrees: only the file itself can tell
    if name == STATE_FILE and command == "sample":
        assert sample_main([str(run), "--max-new-tokens", "2"]) == 0     # sampling never reads the state
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = fails(capsys, command, run)
    assert f"cannot read {folder / name}: Error while deserializing header" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024      # KiB


def test_a_huge_consistent_file_is_refused_from_its_header_before_it_is_hashed(tmp_path):
    """A sparse 16 GiB file whose header is true (one [2**32] float32 tensor): the model's names and shapes are
    compared with the header first, so nothing is hashed, read or allocated."""
    path = CheckpointManager(tmp_path / "ckpt").save(1, nn.Linear(3, 2), {"step": 1})
    f = path / MODEL_FILE
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2 ** 32], "data_offsets": [0, 4 * 2 ** 32]}}).encode()
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + 4 * 2 ** 32)
    if os.stat(f).st_blocks * 512 > 1 << 30:
        pytest.skip("this file system does not keep sparse files")
    m = json.loads((path / MANIFEST).read_text())
    m["files"][MODEL_FILE]["bytes"] = f.stat().st_size          # the right size; the hash is never reached
    (path / MANIFEST).write_text(json.dumps(m))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"does not match this model's architecture:\n.*missing in checkpoint: "
                                              r"bias\n.*shape mismatch: weight: checkpoint \(4294967296,\)"):
        load_model_weights(nn.Linear(3, 2), path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_a_file_of_another_size_than_the_manifest_says_is_refused_before_hashing(tmp_path):
    path = CheckpointManager(tmp_path / "ckpt").save(1, nn.Linear(3, 2), {"step": 1})
    with open(path / STATE_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=r"corrupt: state.safetensors has \d[\d,]* bytes, the manifest says"):
        load_model_weights(nn.Linear(3, 2), path)


def test_bad_aliases_metadata_is_one_line(tmp_path):
    path = CheckpointManager(tmp_path / "ckpt").save(1, nn.Linear(3, 2), {"step": 1})
    lin = nn.Linear(3, 2)
    save_file({"weight": lin.weight.detach(), "bias": lin.bias.detach()}, path / MODEL_FILE,
              metadata={"aliases": "[1, 2]"})
    reseal(path, MODEL_FILE)
    with pytest.raises(CheckpointError, match="'aliases' metadata is not an object of tensor names"):
        load_model_weights(nn.Linear(3, 2), path)


def test_saving_never_follows_or_prunes_links_out_of_ckpt(tmp_path):
    """A linked step folder is not one of the run's checkpoints (never pruned, listed or loaded); a ``best`` that
    links out is ignored by pruning, and the next save replaces ``latest`` instead of writing through a link."""
    model = nn.Linear(3, 2)
    outside = CheckpointManager(tmp_path / "elsewhere").save(1, model, {"step": 1})
    (tmp_path / "elsewhere" / "latest").write_text("kept")
    mgr = CheckpointManager(tmp_path / "ckpt", keep=1)
    mgr.save(2, model, {"step": 2})
    (mgr.root / "step_000001").symlink_to(outside)
    (mgr.root / "best").symlink_to(tmp_path / "elsewhere" / "latest")
    relink(mgr.root / "latest", tmp_path / "elsewhere" / "latest")
    for step in (3, 4):
        mgr.save(step, model, {"step": step})
    assert [p.name for p in mgr.complete()] == ["step_000004"]
    assert (outside / MODEL_FILE).is_file() and (tmp_path / "elsewhere" / "latest").read_text() == "kept"
    assert not (mgr.root / "latest").is_symlink() and mgr.latest().name == "step_000004"
    with pytest.raises(CheckpointError, match="leads to .*elsewhere/step_000001, outside"):
        mgr.resolve("step_000001")
    with pytest.raises(CheckpointError, match="best leads to .*elsewhere/latest, outside"):
        mgr.best()
