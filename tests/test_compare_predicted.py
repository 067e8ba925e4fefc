"""``python -m nanodecoder.compare`` shows each variant's predicted tokens/s (the throughput model's) next to the
measured, and the ratio to the first variant both ways; the prediction is made once, with the plan."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_compare import Launcher, tiny  # noqa: E402,F401  (tiny: the fixture of a tiny char-level blueprint)

from nanodecoder.api import compare as cmp  # noqa: E402
from nanodecoder.cli.compare import main  # noqa: E402


def test_the_table_has_the_predicted_throughput_and_both_ratios(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    predicted = []

    def predict(variants):
        predicted.append([v.label for v in variants])
        return [0.01, 0.04]                          # B predicted 4x slower per step at the same tokens per step
    argv = [str(a) for a in (tiny, tiny, "--set-b", "model.n_layers=1", "--seeds", "1", "--out", out)]
    assert main(argv, launch=Launcher(), predict_steps=predict) == 0
    printed = capsys.readouterr().out
    assert "| predicted tokens/s | vs A: measured / predicted |" in printed
    summary = json.loads((out / "comparison.json").read_text())
    a, b = summary["variants"]
    assert (a["step_s_predicted"], b["step_s_predicted"]) == (0.01, 0.04)
    row_a = next(line for line in printed.splitlines() if line.startswith("| A tiny"))
    row_b = next(line for line in printed.splitlines() if line.startswith("| B tiny"))
    assert f"| {a['tokens_per_step'] / 0.01:,.0f} | 1.000 / 1.000 |" in row_a
    measured = b["tokens_per_s"]["mean"] / a["tokens_per_s"]["mean"]
    assert f"| {b['tokens_per_step'] / 0.04:,.0f} | {measured:.3f} / 0.250 |" in row_b
    assert "ms/step predicted" in printed
    assert main(argv, launch=Launcher(), predict_steps=predict) == 0      # a rerun keeps the plan's prediction
    assert predicted == [["A", "B"]]


def test_the_default_prediction_calibrates_the_variants_shapes(tiny):
    variants = [cmp.load_variant("A", str(tiny)), cmp.load_variant("B", str(tiny), ["model.n_layers=1"])]
    cmp.resolve_vocab(variants, progress=False)
    seconds = cmp.predicted_step_seconds(variants)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    works = [cmp.variant_workload(v) for v in variants]
    assert works[0].tokens_per_step == variants[0].tokens_per_step
    assert works[0].flops > works[1].flops              # two layers against one
