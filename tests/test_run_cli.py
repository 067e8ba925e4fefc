"""``python -m nanodecoder.run``: print-config, dry-run, and clean errors (exit 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import REPO, private_env, run_dirs, subprocess_env, tiny_raw, train_tiny, write_blueprint  # noqa: E402

from nanodecoder.run import main  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


def test_print_config_shows_the_resolved_blueprint(tmp_path, capsys):
    bp = write_blueprint(tmp_path)
    assert main([str(bp), "--set", "train.steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["model"]["d_model"] == 32
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_parameter_table_and_plan_without_training(tmp_path, capsys):
    bp = write_blueprint(tmp_path)
    assert main([str(bp), "--dry-run", "--set", "train.steps=100"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "non-embedding" in out and "token embedding" in out
    assert "100 steps x 64 tokens/step" in out and "nothing trained" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"data": {"source": {"kind": "text", "path": "missing.txt"}, "tokenizer": {"kind": "byte"}}}, "missing.txt"),
    ({"model": {"context_length": 4096}}, "context_length"),
    ({"model": {"vocab_size": 100}}, "vocab_size"),
    ({"data": {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "char"}},
      "sample": {"prompt": "Zebra"}}, "sample.prompt 'Zebra': character 'Z'"),
])
def test_blueprint_and_data_errors_exit_2_with_a_message(tmp_path, capsys, change, message):
    raw = tiny_raw(tmp_path)
    for section, values in change.items():
        raw[section].update(values)
    bp = write_blueprint(tmp_path, raw)
    assert main([str(bp)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_blueprint_prints_no_traceback(tmp_path):
    bp = write_blueprint(tmp_path, train={"stepz": 5})
    proc = subprocess.run([sys.executable, "-m", "nanodecoder.run", str(bp)], cwd=REPO, capture_output=True,
                          text=True, env=subprocess_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "stepz" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_errors_are_clear(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    run = train_tiny(tmp_path)
    assert main(["--resume", str(run), "--set", "model.d_model=64", "--set", "model.block.attention.n_heads=2"]) == 2
    assert "does not match this model's architecture" in capsys.readouterr().err
    model = run / "ckpt/step_000008/model.safetensors"
    model.write_bytes(model.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["--resume", str(run)]) == 2
    assert "is corrupt: model.safetensors" in capsys.readouterr().err


def test_resume_of_a_finished_run_with_more_steps_continues(tmp_path, capsys):
    run = train_tiny(tmp_path)
    assert main(["--resume", str(run), "--set", "train.steps=10"]) == 0
    assert "note: resuming with changed settings: train.steps" in capsys.readouterr().err
    assert yaml.safe_load((run / "blueprint.yaml").read_text())["train"]["steps"] == 10
    assert (run / "ckpt/step_000010/manifest.json").is_file()
    # BLUEPRINT --resume RUN_DIR: the given blueprint (here edited to 12 steps) drives the continuation
    raw = tiny_raw(tmp_path)
    raw["train"]["steps"] = 12
    bp = write_blueprint(tmp_path, raw, name="longer.yaml")
    assert main([str(bp), "--resume", str(run)]) == 0
    assert (run / "ckpt/step_000012/manifest.json").is_file()
    assert json.loads((run / "run.json").read_text())["changed_on_resume"] == ["train.steps", "train.steps"]
    assert run_dirs(tmp_path / "runs") == [run]


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "give a BLUEPRINT, or --resume RUN_DIR" in capsys.readouterr().err


def test_changed_keys_lists_dotted_differences():
    from nanodecoder.cli.run import changed_keys
    old = {"train": {"steps": 8, "lr": 0.1}, "model": {"d_model": 32}}
    new = {"train": {"steps": 9, "lr": 0.1}, "model": {"d_model": 32}, "sample": {"prompt": "x"}}
    assert changed_keys(old, new) == ["sample", "train.steps"]


def test_dry_run_of_an_architecture_without_data_plans_offline(capsys):
    """A zoo blueprint has no data section: --dry-run prints the parameter table and plan, nothing prepared."""
    assert main(["zoo/gemma2_2b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2,614,341,888" in out and "no data section: the architecture only" in out
    assert "optimizer {'kind': 'adamw'" in out
