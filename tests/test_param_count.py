"""``python tools/param_count.py``: the planning report, --compare, --json and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanodecoder.cli.param_count import main
from nanodecoder.cli.blueprint import blueprint_model_spec
from nanodecoder.model.plan import flops

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_the_report_says_what_each_figure_counts(capsys):
    out = run(capsys, "zoo/gpt_oss_120b", "--context", "4096", "--precision", "bf16", "--profile", "gpu_mixed")
    assert "116,829,156,672" in out and "5,132,849,472" in out
    assert "5.13 B   active without the input embedding" in out and "GPT-OSS-120b's 5.1B" in out
    assert "Mixtral's published 12.9B" in out
    assert "FLOPs per token at context 4,096" in out and "3 x forward" in out
    assert "precision bf16 (weights fp32, activations bf16)" in out and "cuda kernels" in out
    for row in ("weights (fp32)", "gradients (fp32)", "optimizer state", "autocast weight copies", "activations",
                "activations per token", "checkpointing", "assumptions:", "KV cache"):
        assert row in out, row


def test_defaults_come_from_the_blueprint(capsys):
    out = run(capsys, "zoo/gpt2_124m")
    assert "FLOPs per token at context 1,024" in out and "micro-batch 1 x 1,024 tokens" in out
    assert "optimizer adamw (2 fp32 states/parameter)" in out and "no checkpointing (this run)" in out
    out = run(capsys, "zoo/gpt2_124m", "--activation-checkpointing", "--batch", "4", "--context", "256")
    assert "checkpointing (this run)" in out and "micro-batch 4 x 256 tokens" in out


def test_compare_puts_blueprints_side_by_side_with_the_ratio(capsys):
    out = run(capsys, "--compare", "zoo/llama3_1_8b", "zoo/mixtral_8x7b", "--context", "4096")
    head, *rows = out.splitlines()
    assert head.split() == ["llama3_1_8b", "mixtral_8x7b", "mixtral_8x7b", "/", "llama3_1_8b"]
    total = next(r for r in rows if r.startswith("parameters, total"))
    assert total.split()[-1] == f"{46_702_792_704 / 8_030_261_248:.3g}x"
    assert any(r.startswith("training memory, ckpt") for r in rows)


def test_json_holds_everything(capsys):
    data = json.loads(run(capsys, "--json", "--compare", "zoo/gpt2_124m", "zoo/gpt2_medium", "--context", "512"))
    entry = data["zoo/gpt2_124m"]
    assert entry["total"] == 124_439_808 and entry["active_non_embedding"] == entry["non_embedding"]
    _, spec = blueprint_model_spec("zoo/gpt2_124m")
    assert entry["flops_per_token"] == entry["flops"]["per_token"]["training"] == flops(spec, 512).training
    memory = entry["memory_bytes"]["no_checkpointing"]
    assert memory["weights"] == 4 * 124_439_808 and memory["optimizer"] == 8 * 124_439_808
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
    assert entry["memory_bytes"]["activation_checkpointing"]["activations"] < memory["activations"]
    assert set(entry["meanings"]) == {"total", "active", "active_non_embedding", "non_embedding"}
    assert entry["setting"]["context"] == 512 and entry["kv_cache_bytes"]["per_token"] == 12 * 2 * 768 * 4
    ratio = data["compare"]["ratios"]["zoo/gpt2_medium"]
    assert data["compare"]["baseline"] == "zoo/gpt2_124m"
    assert ratio["total"] == pytest.approx(354_823_168 / 124_439_808)


def test_world_size_and_fsdp_shard_the_model_state(capsys):
    one = json.loads(run(capsys, "--json", "zoo/mixtral_8x7b"))["zoo/mixtral_8x7b"]
    eight = json.loads(run(capsys, "--json", "zoo/mixtral_8x7b", "--world-size", "8",
                           "--set", "runtime.data_parallel=fsdp"))["zoo/mixtral_8x7b"]
    assert eight["memory_bytes"]["no_checkpointing"]["weights"] == one["memory_bytes"]["no_checkpointing"]["weights"] / 8
    assert eight["setting"]["sharded"] and eight["memory_bytes"]["no_checkpointing"]["gathered"] > 0


@pytest.mark.parametrize("argv, message", [
    (["zoo/gpt2_124m", "--context", "4096"], "--context 4096 is longer than the model's context_length (1024)"),
    (["zoo/gpt2_124m", "--optimizer", "sgd"], "unknown optimizer kind 'sgd'"),
])
def test_bad_input_exits_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_tool_runs_from_a_checkout():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "param_count.py"), "zoo/gpt_oss_120b"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "116,829,156,672" in out.stdout and "training memory per device" in out.stdout
