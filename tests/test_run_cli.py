"""``python -m nanodecoder.run``: print-config, dry-run and its memory plan, clean errors (exit 2, no traceback),
the memory refusal (exit 4)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import REPO, private_env, run_dirs, subprocess_env, tiny_raw, train_tiny, write_blueprint  # noqa: E402

from nanodecoder.cli.common import EXIT_WONT_FIT  # noqa: E402
from nanodecoder.run import main  # noqa: E402
from nanodecoder.runtime import MEMORY_ENV  # noqa: E402


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
    changed = ["--set", "model.d_model=64", "--set", "model.block.attention.n_heads=2"]
    assert main(["--resume", str(run), *changed]) == 2
    err = capsys.readouterr().err
    assert "model.d_model: 32 in the checkpoint, 64 now" in err and "--allow-architecture-change" in err
    assert main(["--resume", str(run), *changed, "--allow-architecture-change"]) == 2   # shapes still must match
    err = capsys.readouterr().err
    assert "does not match this model's architecture" in err and "shape mismatch: " in err
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
    from nanodecoder.api.run import changed_keys
    old = {"train": {"steps": 8, "lr": 0.1}, "model": {"d_model": 32}}
    new = {"train": {"steps": 9, "lr": 0.1}, "model": {"d_model": 32}, "sample": {"prompt": "x"}}
    assert changed_keys(old, new) == ["sample", "train.steps"]


def test_dry_run_of_an_architecture_without_data_plans_offline(capsys, monkeypatch):
    """A zoo blueprint has no data section: --dry-run prints the parameter table and plan, nothing prepared."""
    monkeypatch.setenv(MEMORY_ENV, "1TiB")
    assert main(["zoo/gemma2_2b", "--dry-run", "--set", "train.batch_size=1", "train.grad_accum=12"]) == 0
    out = capsys.readouterr().out
    assert "2,614,341,888" in out and "no data section: the architecture only" in out
    assert "optimizer {'kind': 'adamw'" in out
    assert "memory plan per process" in out and f"available: 1.00 TiB ({MEMORY_ENV}=1TiB)" in out
    assert "fits: " in out


def test_dry_run_of_a_run_too_big_for_the_machine_prints_the_plan_and_exits_4(capsys, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "80GiB")            # one H100
    assert main(["zoo/gpt_oss_120b", "--dry-run", "--set", "train.batch_size=1",
                 "model.context_length=4096"]) == EXIT_WONT_FIT == 4
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    for row in ("weights (fp32)", "gradients (fp32)", "optimizer state", "activations", "total", "checkpointing"):
        assert row in out
    assert "does not fit: the plan needs" in out and "80.00 GiB available" in out
    assert "the weights, gradients and optimizer state alone need 1.70 TiB" in out
    assert "FSDP with activation checkpointing over" in out
    assert err.startswith("error: the run does not fit in memory") and "Traceback" not in err


def test_dry_run_of_a_gpu_profile_without_cuda_prints_the_plan_and_exits_2(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["zoo/gpt2_124m", "--dry-run", "--profile", "gpu_mixed"]) == 2     # training would refuse here
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.startswith("error: runtime profile 'gpu_mixed' (device cuda) needs a CUDA GPU")
    assert "memory plan per process: precision mixed" in out and "cuda kernels" in out
    assert "autocast weight copies" in out
    assert "cannot be checked against the device here: runtime profile 'gpu_mixed'" in out


def test_training_refuses_a_run_that_does_not_fit_before_building_anything(tmp_path, capsys, monkeypatch):
    import nanodecoder.api.run as run_api

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(run_api, "build_model", no_build)
    monkeypatch.setenv(MEMORY_ENV, "64KiB")
    bp = write_blueprint(tmp_path)
    assert main([str(bp)]) == EXIT_WONT_FIT
    err = capsys.readouterr().err
    assert "error: the run does not fit in memory: the plan needs" in err and "64.00 KiB available" in err
    assert f"({MEMORY_ENV}=64KiB)" in err and "--set runtime.check_memory=false tries anyway" in err
    assert not (tmp_path / "runs").exists()
    # the same plan with vocab_size 'auto' is checked once the tokenizer is known, still before any build
    raw = tiny_raw(tmp_path)
    raw["model"]["vocab_size"] = 256
    assert main([str(write_blueprint(tmp_path, raw, name="fixed_vocab.yaml"))]) == EXIT_WONT_FIT
    assert "does not fit" in capsys.readouterr().err


def test_the_memory_check_can_be_overridden(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "64KiB")
    bp = write_blueprint(tmp_path, train={"steps": 2, "eval_every": 0, "checkpoint_every": 0})
    assert main([str(bp), "--set", "runtime.check_memory=false", "sample.enabled=false"]) == 0
    assert len(run_dirs(tmp_path / "runs")) == 1


def test_one_run_spec_per_invocation_for_the_dry_run_and_the_training(tmp_path, capsys, monkeypatch):
    """The run object (``api/run.py``) builds the blueprint's RunSpec once; its dry run and its training use
    that one (resuming, the run's saved blueprint gets one of its own, for the architecture check)."""
    import nanodecoder.api.run as run_api
    built = []

    def counting(bp, vocab_size=None):
        built.append(bp)
        return real(bp, vocab_size)
    real = run_api.run_spec
    monkeypatch.setattr(run_api, "run_spec", counting)
    raw = tiny_raw(tmp_path)
    raw["train"].update(steps=2, eval_every=0, checkpoint_every=0)
    bp = write_blueprint(tmp_path, raw)
    assert main([str(bp), "--dry-run"]) == 0 and len(built) == 1
    assert main([str(bp)]) == 0 and len(built) == 2
    (run,) = run_dirs(tmp_path / "runs")
    assert main(["--resume", str(run), "--set", "train.steps=3"]) == 0 and len(built) == 4
    capsys.readouterr()
