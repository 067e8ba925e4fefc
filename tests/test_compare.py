"""``python -m nanodecoder.compare``: variants x seeds as ordinary runs, alternating, resumable, matched, paired.

The trainings run in this process (``nanodecoder.cli.run.main`` as the launcher, the same argv the command gives
``python -m nanodecoder.run``), on a tiny char-level corpus written here; ``--match time`` gets its step times
from a fake clock, never from real timing.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import make_corpus  # noqa: E402

from nanodecoder.api import compare as cmp  # noqa: E402
from nanodecoder.api.throughput import alternate  # noqa: E402
from nanodecoder.cli import run as run_cli  # noqa: E402
from nanodecoder.cli.compare import main  # noqa: E402
from nanodecoder.data.sources import split_documents  # noqa: E402
from nanodecoder.eval.text import evaluate_text  # noqa: E402
from nanodecoder.api.loading import load_run_model  # noqa: E402

STEPS = 4


def tiny_raw() -> dict:
    return {
        "name": "tiny",
        "model": {"context_length": 16, "d_model": 32, "n_layers": 2,
                  "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}},
        "data": {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "char"}},
        "train": {"steps": STEPS, "batch_size": 4, "lr": 0.01, "eval_every": 2, "eval_steps": 2, "log_every": 1,
                  "checkpoint_every": 0, "seed": 1, "schedule": {"kind": "cosine", "warmup_steps": 1}},
        "logging": {"runs_dir": "runs", "progress": False},
        "sample": {"enabled": False},
        "runtime": {"profile": "cpu"},
    }


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_corpus(tmp_path / "corpus.txt", n_words=2500)
    bp = tmp_path / "tiny.yaml"
    bp.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))
    return bp


class Launcher:
    """``nanodecoder.run``'s main in this process, recording every argv (``cut``: run names whose training is
    cut short at step 2, as an interruption leaves a run)."""

    def __init__(self, cut: tuple[str, ...] = ()):
        self.calls: list[list[str]] = []
        self.cut = cut

    def __call__(self, argv: list[str], capture: bool = False) -> tuple[int, str]:
        self.calls.append(list(argv))
        if any(f"name={name}" in argv for name in self.cut) and "--dry-run" not in argv:
            argv = [*argv, "--set", "train.steps=2"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = run_cli.main(argv)
        return code, out.getvalue()

    def trained(self) -> list[str]:
        """The run names trained (or resumed), in order; dry runs left out."""
        return [next(a.split("=", 1)[1] for a in argv if a.startswith("name="))
                + (" (resumed)" if "--resume" in argv else "")
                for argv in self.calls if "--dry-run" not in argv]


def compare(argv, launch=None, calibrate=None) -> int:
    kwargs = {"launch": launch or Launcher()}
    if calibrate is not None:
        kwargs["calibrate_steps"] = calibrate
    return main([str(a) for a in argv], **kwargs)


def run_folders(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("runs/*/*/blueprint.yaml"))


# ---------------------------------------------------------------------------------------- end to end
def test_two_variants_two_seeds_alternate_resume_and_report(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [tiny, tiny, "--set-b", "model.n_layers=1", "--seeds", "2", "--match", "steps", "--out", out]
    first = Launcher(cut=("B-tiny-seed1",))            # B seed 1 is interrupted after 2 of its 4 steps
    assert compare(argv, first) == 1
    assert first.trained() == ["A-tiny-seed1", "B-tiny-seed1"]
    assert sum("--dry-run" in a for a in first.calls) == 2        # both variants checked before anything trained
    assert "rerun this command to continue" in capsys.readouterr().out

    again = Launcher()
    assert compare(argv, again) == 0
    # the finished run is skipped, the interrupted one resumed from its checkpoint, the rest trained, A/B alternating
    assert again.trained() == ["B-tiny-seed1 (resumed)", "A-tiny-seed2", "B-tiny-seed2"]
    assert not any("--dry-run" in a for a in again.calls)
    printed = capsys.readouterr().out
    assert "A seed 1: finished already" in printed and "| val loss (whole split) |" in printed

    runs = run_folders(out)
    assert [r.parent.name for r in runs] == ["A-tiny-seed1", "A-tiny-seed2", "B-tiny-seed1", "B-tiny-seed2"]
    for run in runs:                    # an ordinary run folder, seeded and sized by the comparison
        saved = yaml.safe_load((run / "blueprint.yaml").read_text())
        assert saved["train"]["steps"] == STEPS and saved["train"]["time_budget"] is None
        assert saved["train"]["seed"] == int(run.parent.name[-1])     # seeds 1, 2: A's train.seed and the next
        assert saved["model"]["n_layers"] == (1 if run.parent.name.startswith("B") else 2)
    mtimes = {r: (r / "metrics.jsonl").stat().st_mtime_ns for r in runs}

    third = Launcher()                  # everything finished: nothing trains, the same result
    summary = json.loads((out / "comparison.json").read_text())
    assert compare(argv, third) == 0
    assert third.calls == []
    assert {r: (r / "metrics.jsonl").stat().st_mtime_ns for r in run_folders(out)} == mtimes
    assert json.loads((out / "comparison.json").read_text())["variants"] == summary["variants"]

    # the whole-split validation loss: every token of the validation split, as `nanodecoder.eval --task text` on it
    a1 = next(r for r in runs if r.parent.name == "A-tiny-seed1")
    model, tokenizer, _, _ = load_run_model(a1, "latest")
    val_text = split_documents([(tmp_path / "corpus.txt").read_text()], 0.1)[1][0]
    reference = evaluate_text(model, tokenizer, val_text)
    va, vb = summary["variants"]
    assert va["runs"][0]["val_loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert va["runs"][0]["val_tokens"] == len(val_text) - 1 == reference["tokens"]

    # the numbers: mean ± std per variant, B - A paired by seed with Student's t (df 1: 12.706)
    a = {int(s): v for s, v in va["val_loss"]["per_seed"].items()}
    b = {int(s): v for s, v in vb["val_loss"]["per_seed"].items()}
    assert sorted(a) == sorted(b) == summary["seeds"] == [1, 2]
    assert va["val_loss"]["mean"] == pytest.approx((a[1] + a[2]) / 2)
    assert va["val_loss"]["std"] == pytest.approx(abs(a[1] - a[2]) / math.sqrt(2))
    d = [b[1] - a[1], b[2] - a[2]]
    half = 12.706 * statistics.stdev(d) / math.sqrt(2)
    assert vb["vs_first"]["mean"] == pytest.approx(sum(d) / 2)
    assert (vb["vs_first"]["low"], vb["vs_first"]["high"]) == pytest.approx((sum(d) / 2 - half, sum(d) / 2 + half))
    assert va["vs_first"] is None
    for v, layers in ((va, 2), (vb, 1)):
        assert v["steps"] == STEPS and v["tokens"] == STEPS * 4 * 16
        assert v["params_total"] == v["params_active"] > 0
        assert v["flops"] == pytest.approx(v["flops_per_token"] * v["tokens"])
        assert v["tokens_per_s"]["mean"] > 0 and len(v["runs"]) == 2
        assert [p["step"] for p in v["runs"][0]["curve"]] == [2, 4]
    assert va["params_total"] > vb["params_total"] and va["flops_per_token"] > vb["flops_per_token"]

    md = (out / "comparison.md").read_text()
    assert "Matched by steps; 2 seed(s) (1, 2), paired by seed." in md
    row_b = next(line for line in md.splitlines() if line.startswith("| B tiny (model.n_layers=1) |"))
    assert f"{vb['val_loss']['mean']:.4f} ± {vb['val_loss']['std']:.4f}" in row_b
    assert f"{vb['vs_first']['mean']:+.4f} [{vb['vs_first']['low']:+.4f}, {vb['vs_first']['high']:+.4f}]" in row_b
    assert re.search(r"\| A tiny \| 4 \| 256 \| .* \| \(reference\) \|", md)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_match_time_takes_step_times_from_one_calibration_and_one_seed_has_no_interval(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    asked = []

    def fake_calibration(variants, prep, rounds, steps, warmup):
        asked.append((tuple(v.label for v in variants), rounds, steps, warmup))
        return [0.25, 0.5]                      # B's steps take twice A's

    launch = Launcher()
    argv = [tiny, tiny, "--set-b", "model.n_layers=1", "--seeds", "1", "--match", "time", "--budget", "1.5s",
            "--calibration-rounds", "2", "--out", out]
    assert compare(argv, launch, fake_calibration) == 0
    assert asked == [(("A", "B"), 2, 5, 3)]
    plan = json.loads((out / "plan.json").read_text())
    assert [v["steps"] for v in plan["variants"]] == [6, 3]      # 1.5 s / 0.25 s and / 0.5 s: each anneals fully
    assert plan["budget_s"] == 1.5 and [v["step_s_measured"] for v in plan["variants"]] == [0.25, 0.5]
    for argv_run, steps in zip([a for a in launch.calls if "--dry-run" not in a], (6, 3)):
        assert f"train.steps={steps}" in argv_run and "train.time_budget=null" in argv_run
    summary = json.loads((out / "comparison.json").read_text())
    b = summary["variants"][1]["vs_first"]
    assert b["n"] == 1 and b["low"] is None and b["high"] is None and b["std"] is None
    md = (out / "comparison.md").read_text()
    assert "One seed: the means are shown without an interval" in md and "250.0 ms" in md

    asked.clear()                               # a rerun keeps the plan: no second calibration
    assert compare(argv, Launcher(), fake_calibration) == 0 and asked == []
    other = Launcher()                          # the folder holds this comparison, not another one
    assert compare([*argv, "--set-b", "model.d_model=16"], other, fake_calibration) == 2
    assert f"{out} holds another comparison (A tiny, B tiny, --match time)" in capsys.readouterr().err
    assert other.calls == [] and asked == []


def test_alternating_calibration_on_a_fake_clock():
    now = [0.0]
    order = []

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, iter(seconds)

        def step(self):
            order.append(self.name)
            now[0] += next(self.seconds)

        def synchronize(self):
            pass

    a = Fake("A", [9.0] + [0.1, 0.1, 0.3, 0.3, 0.2, 0.2])          # a warm-up step that compiles, then 3 rounds
    b = Fake("B", [9.0] + [0.2, 0.2, 0.4, 0.4, 0.1, 0.1])
    times = alternate([(a, a), (b, b)], rounds=3, steps=2, warmup=1, clock=lambda: now[0])
    assert order == ["A", "B"] + ["A", "A", "B", "B"] * 3
    assert times == [pytest.approx([0.1, 0.3, 0.2]), pytest.approx([0.2, 0.4, 0.1])]
    medians = [statistics.median(t) for t in times]
    assert cmp.matched_steps([], "time", step_seconds=medians, budget_s=10.0) == [50, 50]
    assert cmp.matched_steps([], "time", step_seconds=[0.3, 0.7], budget_s=10.0) == [33, 14]


# ---------------------------------------------------------------------------------------- matching arithmetic
def test_match_steps_tokens_flops(tiny):
    a = cmp.load_variant("A", str(tiny), ["train.steps=100"])                          # 4 x 16 = 64 tokens/step
    b = cmp.load_variant("B", str(tiny), ["train.steps=7", "train.batch_size=8"])         # 128 tokens/step
    c = cmp.load_variant("C", str(tiny), ["model.context_length=32", "model.n_layers=4"])  # 128 tokens/step
    variants = [a, b, c]
    cmp.resolve_vocab(variants, progress=False)
    assert [v.tokens_per_step for v in variants] == [64, 128, 128]
    assert cmp.matched_steps(variants, "steps") == [100, 100, 100]          # A's train.steps, not their own
    assert cmp.matched_steps(variants, "tokens") == [100, 50, 50]
    fa, fb, fc = (v.flops_per_token for v in variants)
    assert fb == fa and fc > 2 * fa                  # the planner: the same model, then twice the layers and context
    steps = cmp.matched_steps(variants, "flops")
    assert steps == [100, 50, round(100 * 64 * fa / (128 * fc))]
    assert steps[2] * 128 * fc == pytest.approx(100 * 64 * fa, rel=0.5 / steps[2])


# ---------------------------------------------------------------------------------------- statistics
def test_paired_interval_against_a_hand_computation():
    a = {1: 1.00, 2: 1.20, 3: 1.10}
    b = {1: 0.90, 2: 1.15, 3: 1.00, 4: 0.5}          # seed 4 has no partner: left out
    d = cmp.paired_interval(a, b)
    # differences -0.10, -0.05, -0.10: mean -0.083333, sd 0.0288675, t(0.975, 2) = 4.303
    assert d["seeds"] == [1, 2, 3] and d["n"] == 3
    assert d["mean"] == pytest.approx(-0.0833333, abs=1e-6)
    assert d["std"] == pytest.approx(0.0288675, abs=1e-6)
    assert d["low"] == pytest.approx(-0.0833333 - 4.303 * 0.0288675 / math.sqrt(3), abs=1e-6)
    assert (d["low"], d["high"]) == pytest.approx((-0.155050, -0.011616), abs=1e-5)
    one = cmp.paired_interval({1: 1.0}, {1: 0.9})
    assert one["mean"] == pytest.approx(-0.1) and one["low"] is None and one["std"] is None
    assert cmp.paired_interval({1: 1.0}, {2: 1.0}) is None


def test_t_table_and_its_continuation():
    assert cmp.t_critical(1) == 12.706 and cmp.t_critical(2) == 4.303 and cmp.t_critical(30) == 2.042
    assert all(x > y for x, y in zip(cmp.T975, cmp.T975[1:]))
    # past the table, Abramowitz & Stegun 26.7.5: continuous with it, t(0.975, 60) = 2.000, t(0.975, 120) = 1.980
    assert cmp.t_critical(31) < 2.042 and cmp.t_critical(31) == pytest.approx(2.0395, abs=2e-4)
    assert cmp.t_critical(60) == pytest.approx(2.000, abs=1e-3)
    assert cmp.t_critical(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError):
        cmp.t_critical(0)


def test_no_matplotlib_is_one_line_and_no_plot(tmp_path, monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(cmp, "_pyplot", missing)
    assert cmp.plot({"variants": []}, tmp_path / "x.png") is None
    assert capsys.readouterr().out == "matplotlib is not installed: no comparison plot (pip install matplotlib)\n"
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("argv, says", [
    (["--set-b", "data.tokenizer={kind: byte}"],
     'data.tokenizer.kind: "char" in A, "byte" in B'),
    (["--set-b", "data.source.val_fraction=0.2"],
     "data.source.val_fraction: 0.1 in A, 0.2 in B"),
    (["--set-b", "model.d_modl=64"],
     "variant B"),
    (["--seeds", "0"], "--seeds 0: give 1 or more"),
    (["--budget", "90s"], "--budget is the wall-clock time of --match time"),
    (["--set-c", "model.n_layers=1"], "--set-c given, but there are only 2 variants"),
    (["--match", "time", "--budget", "soon"], "--budget soon: not a duration"),
])
def test_bad_input_is_one_error_before_anything_trains(tiny, tmp_path, capsys, argv, says):
    launch = Launcher()
    assert compare([tiny, tiny, "--out", tmp_path / "cmp", *argv], launch) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error: ") and "Traceback" not in err
    assert launch.calls == [] and not (tmp_path / "cmp").exists()


def test_mismatched_tokenizer_names_the_keys_and_the_fix(tiny, tmp_path, capsys):
    assert compare([tiny, tiny, "--set-b", "data.tokenizer={kind: byte}", "--out", tmp_path / "cmp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "losses would not compare" in err and "give every variant the first one's data.source and " \
                                                 "data.tokenizer" in err


def test_one_variant_is_refused(tiny, capsys):
    assert compare([tiny, "--seeds", "2"]) == 2
    assert "a comparison needs at least two variants, got 1" in capsys.readouterr().err


def test_a_variant_that_fails_training_checks_is_refused_before_any_training(tiny, tmp_path, capsys):
    """It validates, but ``nanodecoder.run --dry-run`` refuses it on this machine: no run starts."""
    launch = Launcher()
    code = compare([tiny, tiny, "--set-b", "runtime.device=cuda:99", "--out", tmp_path / "cmp"], launch)
    err = capsys.readouterr().err
    assert code == 2 and "variant B" in err and "training's checks failed" in err and "cuda:99" in err
    assert launch.trained() == [] and len(launch.calls) == 2 and all("--dry-run" in a for a in launch.calls)
    assert not (tmp_path / "cmp" / "plan.json").exists()
