"""``--resume`` refuses any change to the ``model:`` section (defaults filled in first), naming each changed key;
``--allow-architecture-change`` loads shape-compatible changes and lists them; training settings may change."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from nanodecoder.cli.run import main
from nanodecoder.train.loop import architecture_changes
from trainhelpers import private_env, tiny_raw, train_tiny, write_blueprint


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def run(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["train"].update(steps=4, eval_every=0, checkpoint_every=4)
    raw["sample"]["enabled"] = False
    return train_tiny(tmp_path, raw=raw)


def test_a_changed_model_section_is_refused_key_by_key(run, capsys):
    capsys.readouterr()
    assert main(["--resume", str(run), "--set", "model.block.attention.n_heads=4",
                 "model.block.norm={kind: layernorm, eps: 1.0e-6}", "model.block.mlp.approximate=tanh", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == f"error: cannot resume {run}: the model section differs from the one its checkpoints were " \
                       "trained with:"
    assert "  model.block.attention.n_heads: 2 in the checkpoint, 4 now" in lines
    assert "  model.block.norm.eps: 1e-05 in the checkpoint, 1e-06 now" in lines
    assert '  model.block.mlp.approximate: "none" in the checkpoint, "tanh" now' in lines
    assert "--allow-architecture-change" in lines[-1] and "Traceback" not in err
    assert not any("train.steps" in line for line in lines)     # training settings are not architecture
    assert not (run / "ckpt/step_000006").exists()
    assert main(["--resume", str(run), "--dry-run", "--set", "model.block.attention.n_heads=4"]) == 2   # alike
    assert "model.block.attention.n_heads: 2 in the checkpoint, 4 now" in capsys.readouterr().err


def test_writing_a_default_or_changing_training_settings_is_no_architecture_change(run, tmp_path, capsys):
    raw = tiny_raw(tmp_path)
    raw["model"]["block"]["norm"] = {"kind": "layernorm", "eps": 1.0e-5}     # the defaults, written out
    raw["model"]["vocab_size"] = 256                                         # what 'auto' resolved to
    raw["train"].update(steps=6, eval_every=0, checkpoint_every=2, lr=0.005)
    raw["sample"]["enabled"] = False
    bp = write_blueprint(tmp_path, raw, name="explicit.yaml")
    capsys.readouterr()
    assert main([str(bp), "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "note: resuming with changed settings: train.checkpoint_every, train.lr, train.steps" in err
    assert "architecture" not in err
    assert (run / "ckpt/step_000006/manifest.json").is_file()


def test_the_flag_loads_a_shape_compatible_change_and_records_it(run, capsys):
    capsys.readouterr()
    changes = ["model.block.attention.n_heads=4", "model.block.norm={kind: layernorm, eps: 1.0e-6}", "train.steps=6"]
    assert main(["--resume", str(run), "--allow-architecture-change", "--set", *changes]) == 0
    err = capsys.readouterr().err
    assert ("note: resuming with a changed architecture (--allow-architecture-change): "
            "model.block.attention.n_heads: 2 in the checkpoint, 4 now; "
            "model.block.norm.eps: 1e-05 in the checkpoint, 1e-06 now") in err
    assert (run / "ckpt/step_000006/manifest.json").is_file()
    saved = yaml.safe_load((run / "blueprint.yaml").read_text())
    assert saved["model"]["block"]["attention"]["n_heads"] == 4
    recorded = json.loads((run / "run.json").read_text())["changed_on_resume"]
    assert recorded == ["train.steps", "model.block.attention.n_heads", "model.block.norm.eps"]
    assert main(["--resume", str(run), "--set", "train.steps=8"]) == 0     # the new architecture is the run's now


def test_the_flag_still_refuses_other_shapes_naming_the_tensor(run, capsys):
    capsys.readouterr()
    assert main(["--resume", str(run), "--allow-architecture-change", "--set", "model.d_model=48",
                 "model.block.attention.n_heads=2"]) == 2
    err = capsys.readouterr().err
    assert "does not match this model's architecture" in err
    mismatch = [line for line in err.splitlines() if line.startswith("  shape mismatch: ")]
    assert mismatch and re.search(r"[\w.]+\.weight: checkpoint \(\d+, 32\) vs model \(\d+, 48\)", mismatch[0])
    assert "Traceback" not in err


def test_the_flag_needs_resume(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(write_blueprint(tmp_path)), "--allow-architecture-change"])
    assert e.value.code == 2 and "--allow-architecture-change needs --resume RUN_DIR" in capsys.readouterr().err


def test_architecture_changes_compare_leaves_and_kinds():
    old = {"d_model": 32, "mlp": {"kind": "gelu", "approximate": "none"}}
    new = {"d_model": 32, "mlp": {"kind": "swiglu"}}
    assert architecture_changes(old, new) == ['model.mlp.approximate: "none" in the checkpoint, absent now',
                                              'model.mlp.kind: "gelu" in the checkpoint, "swiglu" now']
    assert architecture_changes(old, json.loads(json.dumps(old))) == []
