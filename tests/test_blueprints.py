"""Every shipped blueprint validates, builds (meta and real), and trains one step at reduced size."""
from pathlib import Path

import pytest
import torch

from nanodecoder.cli.blueprint import blueprint_model_spec, load_blueprint
from nanodecoder.model import build_model
from nanodecoder.model.params import count_blueprint
from nanodecoder.resources import blueprints_dir
from nanodecoder.model.plan import param_report

SHIPPED = sorted([p.name for p in blueprints_dir().glob("*.yaml")]
                 + [f"speedrun/{p.name}" for p in (blueprints_dir() / "speedrun").glob("*.yaml")])
SMALL = ["model.d_model=64", "model.n_layers=2", "model.context_length=16", "model.vocab_size=97"]


def test_the_shipped_set_is_complete():
    for name in ["dense_gpt.yaml", "moe_gpt.yaml", "switch_gpt.yaml", "deepseek_style_moe.yaml",
                 "gpt2_124m.yaml", "nanogpt_cpu_char.yaml", "seed_moe_gpt.yaml", "speedrun/shakespeare_char_cpu.yaml"]:
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_blueprint_validates_and_builds_on_meta(name):
    bp, spec = blueprint_model_spec(blueprints_dir() / name, vocab_size=97)
    assert bp.raw["model"]["n_layers"] == spec.n_layers
    report = count_blueprint(spec)
    assert report.total > 0 and 0 < report.active <= report.total


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_blueprint_trains_one_step_at_reduced_size(name):
    raw = load_blueprint(blueprints_dir() / name).raw["model"]
    heads = raw["block"]["attention"]["n_heads"]
    over = list(SMALL)
    if 64 % heads:
        over.append("model.block.attention={kind: causal, n_heads: 4}")
    _, spec = blueprint_model_spec(blueprints_dir() / name, over)
    torch.manual_seed(0)
    model = build_model(spec)
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx.roll(-1, 1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_gpt2_124m_is_exactly_gpt2_small():
    _, spec = blueprint_model_spec(blueprints_dir() / "gpt2_124m.yaml")
    report = count_blueprint(spec)
    assert report.total == 124_439_808
    assert report.active == report.total


def test_moe_twin_has_the_dense_active_params():
    _, dense = blueprint_model_spec(blueprints_dir() / "dense_gpt.yaml", vocab_size=2048)
    _, moe = blueprint_model_spec(blueprints_dir() / "moe_gpt.yaml", vocab_size=2048)
    d, m = count_blueprint(dense), count_blueprint(moe)
    router = 8 * dense.d_model * dense.n_layers
    assert m.active == d.active + router
    assert m.total > 2 * d.total


def test_param_count_cli(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "tools" / "param_count.py"),
                          str(root / "blueprints" / "gpt2_124m.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "124,439,808" in out.stdout
    out = subprocess.run([sys.executable, str(root / "tools" / "param_count.py"), "--json",
                          str(root / "blueprints" / "moe_gpt.yaml")], capture_output=True, text=True, timeout=120)
    import json
    data = json.loads(out.stdout)
    (entry,) = data.values()
    assert entry["active"] < entry["total"]


REDUCED = {
    # the original design's default MoE, shrunk: 2 layers (MoE in layer 0), 64 wide, byte tokens
    "seed_moe_gpt.yaml": ["model.n_layers=2", "model.d_model=64", "model.context_length=32",
                          "model.vocab_size=auto", "model.block.attention={kind: causal, n_heads: 4, bias: true}",
                          "model.overrides[0].mlp.expert_hidden=128"],
    "moe_gpt.yaml": ["model.n_layers=2", "model.d_model=64", "model.context_length=32",
                     "model.block.attention={kind: causal, n_heads: 4}", "model.block.mlp.expert_hidden=64"],
}


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_moe_blueprint_trains_20_steps_at_reduced_size(name, tmp_path, monkeypatch):
    import json

    from nanodecoder.run import main
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    over = REDUCED[name] + [
        "data.source={kind: python_stdlib, max_bytes: 300000}", "data.tokenizer={kind: byte}",
        "train.steps=20", "train.batch_size=4", "train.grad_accum=1", "train.eval_every=10", "train.eval_steps=2",
        "train.log_every=5", "train.checkpoint_every=20", "train.schedule={kind: cosine, warmup_steps: 2}",
        f"logging.runs_dir={tmp_path / 'runs'}", "logging.progress=false", "sample.max_new_tokens=8"]
    over = [o.replace("overrides[0]", "overrides.0") for o in over]
    assert main([str(blueprints_dir() / name), "--set", *over]) == 0
    (run,) = (tmp_path / "runs").glob("*/*")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == 20
    assert "moe/layer0/load" in train[-1] and "moe/layer0/dropped_frac" in train[-1], "MoE statistics are logged"
    assert (run / "expert_load.png").is_file()


@pytest.mark.parametrize("name", SHIPPED)
def test_analytic_count_equals_the_built_count(name):
    _, spec = blueprint_model_spec(name, vocab_size=256)
    built = count_blueprint(spec)
    analytic = param_report(spec)
    assert (analytic.total, analytic.active, analytic.embedding) == (built.total, built.active, built.embedding)


def test_the_speedrun_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """The speedrun blueprint as shipped (Muon with its AdamW part, untied head, ReLU², WSD), a few steps on
    a small text: the step budget replaces the time budget here, so nothing depends on this machine's speed."""
    import json
    from nanodecoder.cli.run import main as run_main
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text("ROMEO:\nBefore we proceed any further, hear me speak.\n" * 60)
    code = run_main([str(blueprints_dir() / "speedrun" / "shakespeare_char_cpu.yaml"),
                     "--set", f"data.source={{kind: text, path: {tmp_path / 'text.txt'}}}",
                     "--set", f"logging.runs_dir={tmp_path}",
                     "--set", "train.time_budget=null", "--set", "train.steps=30", "--set", "logging.plots=false",
                     "--set", "sample.max_new_tokens=8"])
    assert code == 0
    (metrics,) = tmp_path.glob("shakespeare_char_cpu/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert rows[-1]["kind"] == "eval" and losses[-1] < losses[0] - 1.0
