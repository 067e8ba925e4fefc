"""Whole runs: the run directory, exact resume after SIGTERM, NaN stop, MoE metrics, W&B offline/online."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nanodecoder.data import load_tokenizer
from nanodecoder.cli.run import main
from nanodecoder.train.checkpoint import CheckpointManager, verify_checkpoint
from nanodecoder.train.metrics import read_rows
from nanodecoder.train.trainer import Trainer
from trainhelpers import REPO, run_dirs, subprocess_env, tiny_raw, train_tiny, wandb_history, write_blueprint


def rows(run, kind):
    return [r for r in read_rows(run / "metrics.jsonl") if r["kind"] == kind]


def test_run_directory_holds_everything(trained_run):
    run = trained_run
    assert run.parent.name == "tiny" and len(run.name) >= 15          # <runs>/<name>/<timestamp>
    bp = yaml.safe_load((run / "blueprint.yaml").read_text())
    assert bp["train"]["steps"] == 8 and bp["data"]["source"]["path"] == "corpus.txt"
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["step"] == 8 and os.path.isabs(meta["base_dir"])
    train = rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["tokens"] for r in train] == [64 * s for s in range(1, 9)]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step", "elapsed_s"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"]
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] > 0 and r["best_val_loss"] <= r["val_loss"] for r in evals)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "expert_load.png").exists()                     # dense model
    samples = (run / "samples.txt").read_text()
    assert samples.startswith("# step 8") and "\nthe " in samples
    assert load_tokenizer(run / "tokenizer").vocab_size == 256
    mgr = CheckpointManager(run / "ckpt")
    assert [p.name for p in mgr.complete()] == ["step_000004", "step_000008"]
    assert mgr.latest().name == "step_000008" and mgr.best().name == "step_000008"
    assert verify_checkpoint(mgr.latest())["step"] == 8


def test_sigterm_checkpoint_then_resume_reproduces_the_run_bit_for_bit(tmp_path, trained_run, monkeypatch):
    real_step = Trainer.step

    def step_then_sigterm(self):
        out = real_step(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # as if the scheduler stopped the job here
        return out
    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    bp = write_blueprint(tmp_path)
    assert main([str(bp)]) == 128 + signal.SIGTERM
    (run,) = run_dirs(tmp_path / "runs")
    assert CheckpointManager(run / "ckpt").latest().name == "step_000003"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not (run / "samples.txt").exists()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert main(["--resume", str(run)]) == 0
    assert [r["loss"] for r in rows(run, "train")] == [r["loss"] for r in rows(trained_run, "train")]
    assert [r["val_loss"] for r in rows(run, "eval")] == [r["val_loss"] for r in rows(trained_run, "eval")]
    final = load_file(run / "ckpt/step_000008/model.safetensors")
    reference = load_file(trained_run / "ckpt/step_000008/model.safetensors")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert (run / "samples.txt").read_text() == (trained_run / "samples.txt").read_text()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    real_step = Trainer.step

    def step_then_ctrl_c(self):
        out = real_step(self)
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    assert main([str(write_blueprint(tmp_path))]) == 130
    assert "SIGINT received: checkpoint saved at step 2" in capsys.readouterr().err
    (run,) = run_dirs(tmp_path / "runs")
    assert CheckpointManager(run / "ckpt").latest().name == "step_000002"
    assert signal.getsignal(signal.SIGINT) is before                  # our handler was removed again


def test_sigterm_to_a_training_process_saves_a_checkpoint_and_exits(tmp_path):
    # long enough (tens of seconds) to be still training when the signal comes, short enough to end by itself
    bp = write_blueprint(tmp_path, train={"steps": 5000, "eval_every": 1, "eval_steps": 1, "checkpoint_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "nanodecoder.run", str(bp)], cwd=REPO,
                            env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)      # bounds the test even if the child never prints
    watchdog.start()
    try:
        for line in proc.stderr:                  # the first evaluation line: training is under way
            if "val loss" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: checkpoint saved at step" in err and "--resume" in err
    (run,) = run_dirs(tmp_path / "runs")
    latest = CheckpointManager(run / "ckpt").latest()
    assert latest is not None and verify_checkpoint(latest)["step"] >= 1


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, capsys):
    bp = write_blueprint(tmp_path, train={"lr": 1e30, "grad_clip": None, "eval_every": 0})
    assert main([str(bp)]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss (NaN or inf) at step" in err
    (run,) = run_dirs(tmp_path / "runs")
    step = int(err.split("at step ")[1].split(";")[0])
    assert rows(run, "train")[-1]["step"] == step - 1
    assert json.loads((run / "run.json").read_text())["status"] == "non-finite"


def test_moe_run_logs_router_statistics_and_draws_the_load_heatmap(tmp_path, capsys):
    raw = tiny_raw(tmp_path, moe=True)
    raw["logging"]["progress"] = True
    run = train_tiny(tmp_path, raw=raw)
    assert "8/8" in capsys.readouterr().err                            # the progress bar ran to the end
    row = rows(run, "train")[-1]
    assert row["aux_loss"] > 0 and len(row["moe/layer0/load"]) == 4
    assert {"moe/layer1/lb_loss", "moe/layer1/dropped_frac", "moe/layer1/router_entropy",
            "moe/empty_experts"} <= set(row)
    assert (run / "expert_load.png").read_bytes()[:4] == b"\x89PNG"


def test_wandb_offline_logs_the_same_metrics_under_the_run_dir(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["logging"]["wandb"] = {"mode": "offline", "project": "tests", "tags": ["ci"]}
    run = train_tiny(tmp_path, raw=raw)
    assert json.loads((run / "run.json").read_text())["wandb_id"]
    history = wandb_history(run)
    by_step = {}
    for h in history:
        by_step.setdefault(h["_step"], {}).update(h)
    for r in rows(run, "train"):
        assert by_step[r["step"]]["train/loss"] == pytest.approx(r["loss"])
    for r in rows(run, "eval"):
        assert by_step[r["step"]]["val/val_loss"] == pytest.approx(r["val_loss"])


def test_wandb_online_without_credentials_fails_fast(tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                # no ~/.netrc
    raw = tiny_raw(tmp_path)
    raw["logging"]["wandb"] = {"mode": "online"}
    bp = write_blueprint(tmp_path, raw)
    assert main([str(bp)]) == 2
    assert "no W&B credentials were found (set WANDB_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()                  # refused before any work


def test_resume_from_a_chosen_checkpoint_when_the_latest_is_damaged(tmp_path, trained_run, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    weights = run / "ckpt/step_000008/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")          # the latest checkpoint is damaged
    assert main(["--resume", str(run)]) == 2
    assert "--checkpoint" in capsys.readouterr().err                  # the error says how to go on
    assert main(["--resume", str(run), "--checkpoint", "step_000004"]) == 0
    assert [r["loss"] for r in rows(run, "train")] == [r["loss"] for r in rows(trained_run, "train")]
    assert (run / "ckpt/superseded/step_000008").is_dir()               # kept aside, not deleted
    with pytest.raises(SystemExit):                                     # --checkpoint without --resume
        main(["--checkpoint", "step_000004", str(run / "blueprint.yaml")])
