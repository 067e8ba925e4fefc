"""``python -m nanodecoder.eval`` and the blueprint's ``eval:`` section during training."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evalhelpers import HELLASWAG, make_run_dir
from nanodecoder.cli.eval import main
from trainhelpers import REPO, run_dirs, subprocess_env, tiny_raw, write_blueprint


def test_hellaswag_and_text_from_the_command_line(tmp_path, capsys):
    run = make_run_dir(tmp_path)
    assert main([str(run), "--task", "hellaswag", "--data", str(HELLASWAG), "--json", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "hellaswag" and out["n"] == 6 and 0 <= out["acc"] <= 1 and 0 <= out["acc_norm"] <= 1
    assert out["acc_norm_normalization"] == "per_token_mean" and out["checkpoint"].endswith("step_000001")
    text = tmp_path / "held.txt"
    text.write_text("some held-out text, " * 20)
    assert main([str(run), "--task", "text", "--data", str(text), "--stride", "24"]) == 0
    line = capsys.readouterr().out
    assert "bits/byte" in line and f"{len(text.read_bytes()) - 1:,} bytes" in line and "stride 24" in line
    assert main([str(run), "--task", "hellaswag", "--data", str(HELLASWAG)]) == 0
    assert "acc_norm" in capsys.readouterr().out


def test_bad_data_exits_2_with_the_record_number_and_no_traceback(tmp_path):
    run = make_run_dir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(HELLASWAG.read_text().splitlines()[0] + "\n" + '{"ctx": "x", "endings": ["a", "b"]}\n')
    proc = subprocess.run([sys.executable, "-m", "nanodecoder.eval", str(run), "--task", "hellaswag",
                           "--data", str(bad)], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "record 2 (line 2): missing field 'label'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--task", "text", "--data", "missing.txt"], "missing.txt: no such file"),
    (["--task", "hellaswag", "--data", str(HELLASWAG), "--limit", "0"], "--limit >= 1"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, message):
    run = make_run_dir(tmp_path)
    assert main([str(run), *argv]) == 2
    assert message in capsys.readouterr().err
    assert main([str(tmp_path), "--task", "hellaswag", "--data", str(HELLASWAG)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_eval_section_logs_hellaswag_and_bpb_rows_during_training(tmp_path, capsys):
    from nanodecoder.cli.run import main as run_main
    raw = tiny_raw(tmp_path)
    raw["train"].update({"steps": 4, "eval_every": 4, "checkpoint_every": 4})
    raw["logging"]["plots"] = False
    raw["sample"] = {"enabled": False}
    raw["eval"] = {"hellaswag": {"data": str(HELLASWAG), "every": 2, "limit": 4, "batch_size": 2},
                   "text": {"data": "corpus.txt", "every": 0}}
    assert run_main([str(write_blueprint(tmp_path, raw))]) == 0
    assert "HellaSwag acc" in capsys.readouterr().err
    (run,) = run_dirs(tmp_path / "runs")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hs = [r for r in rows if "hellaswag_acc" in r]
    assert [r["step"] for r in hs] == [2, 4] and all(r["kind"] == "eval" and r["hellaswag_n"] == 4 for r in hs)
    (text,) = [r for r in rows if "text_bpb" in r]
    assert text["step"] == 4 and text["text_bpb"] > 0 and text["text_loss"] > 0


def test_eval_section_errors_are_reported_before_training(tmp_path, capsys):
    from nanodecoder.cli.run import main as run_main
    raw = tiny_raw(tmp_path)
    raw["eval"] = {"hellaswag": {"data": "nope.jsonl", "evry": 3}}
    assert run_main([str(write_blueprint(tmp_path, raw))]) == 2
    assert "eval.hellaswag.evry" in capsys.readouterr().err
    raw["eval"] = {"hellaswag": {"data": "nope.jsonl"}}
    assert run_main([str(write_blueprint(tmp_path, raw))]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert not run_dirs(tmp_path / "runs")
