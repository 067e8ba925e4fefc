"""``tools/compare_runs.py --nanogpt-log``: nanoGPT's train.py log read as a validation curve."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", TOOL)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_log(path: Path) -> Path:
    # what nanoGPT's train.py prints with --eval_interval=2 --log_interval=1: an evaluation before iteration 0,
    # 2 and 4; the iteration right after an evaluation is timed with the evaluation in it (2000 ms here)
    lines = ["step 0: train loss 4.2000, val loss 4.1900",
             "iter 0: loss 4.2, time 2000.00ms, mfu -100.00%",
             "iter 1: loss 3.9, time 30.00ms, mfu -100.00%",
             "step 2: train loss 3.5000, val loss 3.6000",
             "iter 2: loss 3.4, time 2000.00ms, mfu 1.00%",
             "iter 3: loss 3.2, time 50.00ms, mfu 1.00%",
             "step 4: train loss 3.0000, val loss 3.1000",
             "iter 4: loss 3.0, time 2000.00ms, mfu 1.00%"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nanogpt_log_gives_val_loss_at_training_time_without_evaluation_pauses(tmp_path):
    points = compare_runs.nanogpt_curve(write_log(tmp_path / "n.log"), tokens_per_iter=768)
    assert [p["step"] for p in points] == [0, 2, 4]
    assert [p["val_loss"] for p in points] == [4.19, 3.6, 3.1]
    assert [p["tokens"] for p in points] == [0, 1536, 3072]
    # iterations after an evaluation count as the median ordinary iteration (40 ms of 30 and 50)
    assert points[1]["elapsed_s"] == pytest.approx(0.040 + 0.030)
    assert points[2]["elapsed_s"] == pytest.approx(0.070 + 0.040 + 0.050)
    assert compare_runs.loss_at(points, 0.115) == pytest.approx(3.6 + 0.5 * (3.1 - 3.6))


def test_main_draws_the_nanogpt_curve_and_refuses_a_log_without_its_lines(tmp_path, capsys):
    out = tmp_path / "c.png"
    assert compare_runs.main(["--nanogpt-log", str(write_log(tmp_path / "n.log")), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert "nanoGPT train.py" in capsys.readouterr().out
    (tmp_path / "bad.log").write_text("hello\n")
    with pytest.raises(SystemExit, match="no nanoGPT 'iter N"):
        compare_runs.main(["--nanogpt-log", str(tmp_path / "bad.log"), "--out", str(out)])
