"""train.time_budget with a fake clock: the step count is fixed from the measured speed (the first, compiling
step left out), stored in the checkpoint so a resume is exact, the schedule anneals over the fixed count,
evaluation time is not counted, and a run that slows down stops when the clock runs out."""
from __future__ import annotations

import json
import signal

import pytest

from nanodecoder.cli.run import main
from nanodecoder.train import loop
from nanodecoder.train.metrics import read_rows
from nanodecoder.train.trainer import Trainer
from trainhelpers import run_dirs, tiny_raw, write_blueprint


ORIGINAL_STEP, ORIGINAL_EVALUATE = Trainer.step, Trainer.evaluate


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(loop, "clock", fake)
    return fake


def step_costs(monkeypatch, clock, seconds):
    """Trainer.step advances the fake clock by seconds(step) (1-based); evaluations take 100 s, uncounted."""
    real_step, real_eval = ORIGINAL_STEP, ORIGINAL_EVALUATE

    def step(self):
        clock.now += seconds(self.step_count + 1)
        return real_step(self)

    def evaluate(self):
        clock.now += 100.0
        return real_eval(self)
    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def budget_raw(tmp_path, budget="30s", probe=4):
    raw = tiny_raw(tmp_path)
    raw["train"].update(time_budget=budget, budget_probe_steps=probe, steps=1000, eval_every=5,
                        checkpoint_every=5, schedule={"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    raw["sample"]["max_new_tokens"] = 2
    return raw


def test_the_budget_fixes_the_step_count_from_the_measured_speed(tmp_path, monkeypatch, clock):
    step_costs(monkeypatch, clock, lambda s: 5.0 if s == 1 else 1.0)       # step 1 compiles
    assert main([str(write_blueprint(tmp_path, budget_raw(tmp_path)))]) == 0
    (run,) = run_dirs(tmp_path / "runs")
    rows = read_rows(run / "metrics.jsonl")
    (fixed,) = [r for r in rows if r["kind"] == "budget"]
    # 4 probe steps took 5 + 3 x 1 s; 1 s/step without step 1; (30 - 8) / 1 = 22 more steps
    assert fixed["step"] == 4 and fixed["ms_per_step"] == pytest.approx(1000.0) and fixed["total_steps"] == 26
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == 26
    assert train[-1]["lr"] == pytest.approx(0.01 * 0.1, rel=0.05)                # annealed over the 26 steps
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["step"] == 26
    state = json.loads((run / "ckpt" / "step_000026" / "state.json").read_text())
    assert state["total_steps"] == 26 and state["train_time_s"] == pytest.approx(30.0)


def test_a_run_that_slows_down_stops_when_the_clock_runs_out(tmp_path, monkeypatch, clock):
    step_costs(monkeypatch, clock, lambda s: 1.0 if s <= 4 else 3.0)
    assert main([str(write_blueprint(tmp_path, budget_raw(tmp_path, budget="20s")))]) == 0
    (run,) = run_dirs(tmp_path / "runs")
    meta = json.loads((run / "run.json").read_text())
    # fixed at 4 + 16 = 20 steps; at 3 s a step the 20 s are spent after step 10
    assert meta["status"] == "out of time" and meta["step"] == 10
    assert (run / "ckpt" / "step_000010" / "manifest.json").is_file()
    assert [r for r in read_rows(run / "metrics.jsonl") if r["kind"] == "eval"][-1]["step"] == 10


def test_resume_keeps_the_fixed_count(tmp_path, monkeypatch, clock):
    step_costs(monkeypatch, clock, lambda s: 1.0)
    raw = budget_raw(tmp_path, budget="12s", probe=3)
    bp = write_blueprint(tmp_path, raw)
    assert main([str(bp)]) == 0
    (run,) = run_dirs(tmp_path / "runs")
    full = [r["loss"] for r in read_rows(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(full) == 12

    # the same run interrupted after step 5, then resumed on a machine twice as slow: same 12 steps, same losses
    stop_at = {"n": 5}
    real_step = Trainer.step            # 1 s a step

    def interrupted(self):
        out = real_step(self)
        if self.step_count == stop_at["n"]:
            signal.raise_signal(signal.SIGTERM)          # the loop saves a checkpoint at this step and exits
        return out
    monkeypatch.setattr(Trainer, "step", interrupted)
    tmp2 = tmp_path / "again"
    tmp2.mkdir()
    raw2 = budget_raw(tmp2, budget="12s", probe=3)
    bp2 = write_blueprint(tmp2, raw2)
    assert main([str(bp2)]) == 128 + signal.SIGTERM
    (run2,) = run_dirs(tmp2 / "runs")
    step_costs(monkeypatch, clock, lambda s: 0.5)
    assert main([str(bp2), "--resume", str(run2)]) == 0
    resumed = [r["loss"] for r in read_rows(run2 / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed == full


# ---------------------------------------------------------------- re-planned while the schedule does not depend on it
WSD = {"kind": "wsd", "warmup_steps": 2, "decay_fraction": 0.25}


def wsd_raw(tmp_path, budget="40s"):
    raw = budget_raw(tmp_path, budget=budget, probe=4)
    raw["train"].update(schedule=dict(WSD), eval_every=0, checkpoint_every=0)
    return raw


def wsd_run(tmp_path, monkeypatch, clock, seconds):
    step_costs(monkeypatch, clock, seconds)
    assert main([str(write_blueprint(tmp_path, wsd_raw(tmp_path)))]) == 0
    (run,) = run_dirs(tmp_path / "runs")
    rows = read_rows(run / "metrics.jsonl")
    return run, rows, [r for r in rows if r["kind"] == "budget"], [r for r in rows if r["kind"] == "train"]


def decay_start(total: int) -> int:
    return total - max(1, round(0.25 * total))


def faster_after_ten(s):
    return 1.0 if s <= 10 else 0.5


@pytest.mark.parametrize("seconds, first_total", [(faster_after_ten, 40),
                                                  (lambda s: 1.0 if s <= 10 else 1.5, 40)])
def test_wsd_is_re_planned_until_its_decay_starts_and_ends_the_decay_in_the_budget(
        tmp_path, monkeypatch, clock, seconds, first_total):
    run, rows, budget, train = wsd_run(tmp_path, monkeypatch, clock, seconds)
    first, final = budget
    # 1 s/step over steps 2-4: (40 - 4) / 1 s -> 40 steps
    assert (first["step"], first["total_steps"], first["final"]) == (4, first_total, False)
    total = final["total_steps"]
    assert final["final"] and final["step"] == decay_start(total)     # fixed for good where the decay starts
    assert train[-1]["step"] == total and total != first_total        # the speed change moved the end
    assert train[-1]["lr"] == pytest.approx(0.0, abs=1e-12)            # the decay reached its end ...
    spent = sum(seconds(s) for s in range(1, total + 1))
    assert 36.0 <= spent <= 40.0                                       # ... inside the budget, using 90%+ of it
    # no learning rate changed under a step that had taken it: warm-up, then the peak up to the decay
    assert all(r["lr"] == pytest.approx(0.01) for r in train if 2 <= r["step"] <= final["step"])
    state = json.loads((run / "ckpt" / f"step_{total:06d}" / "state.json").read_text())
    assert state["total_steps"] == total and state["budget_replanned"] is True
    assert state["train_time_s"] == pytest.approx(spent)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_without_the_re_plan_the_slower_run_would_have_run_out_of_time():
    """The check above is not vacuous: 40 steps at 1 s then 1.5 s take 10 + 45 s > 40 s."""
    assert sum(1.0 if s <= 10 else 1.5 for s in range(1, 41)) > 40


def test_resume_keeps_the_final_count(tmp_path, monkeypatch, clock):
    _, _, (_, final), train = wsd_run(tmp_path, monkeypatch, clock, faster_after_ten)
    full = [r["loss"] for r in train]
    stop_after = final["step"] + 3

    tmp2 = tmp_path / "again"
    tmp2.mkdir()
    bp2 = write_blueprint(tmp2, wsd_raw(tmp2))
    step_costs(monkeypatch, clock, faster_after_ten)
    timed_step = Trainer.step

    def interrupted(self):
        out = timed_step(self)
        if self.step_count == stop_after:
            signal.raise_signal(signal.SIGTERM)
        return out
    monkeypatch.setattr(Trainer, "step", interrupted)
    assert main([str(bp2)]) == 128 + signal.SIGTERM
    (run2,) = run_dirs(tmp2 / "runs")
    step_costs(monkeypatch, clock, lambda s: 0.25)       # a faster machine: the final count stays
    assert main([str(bp2), "--resume", str(run2)]) == 0
    rows = read_rows(run2 / "metrics.jsonl")
    assert [r["loss"] for r in rows if r["kind"] == "train"] == full
    assert [r["kind"] for r in rows].count("budget") == 2
