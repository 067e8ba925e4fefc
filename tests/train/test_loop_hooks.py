"""The training loop is optimizer steps plus hooks: a hook added to a run's standard ones sees every step, and a
stop it asks for ends the run after the checkpoint hook saved that step."""
from __future__ import annotations

from nanodecoder.train.checkpoint import verify_checkpoint
from nanodecoder.train.hooks import CheckpointHook, standard_hooks
from nanodecoder.train.loop import Hook, Stop, TrainingLoop
from nanodecoder.train.metrics import read_rows
from nanodecoder.train.rundir import RunDir
from nanodecoder.train.spec import LoggingSpec, SampleSpec
from trainhelpers import make_trainer


class StopAfter(Hook):
    def __init__(self, step: int):
        self.at, self.seen, self.ended = step, [], None

    def after_step(self, loop, step) -> None:
        self.seen.append((step.number, step.total))
        if step.number == self.at:
            step.stop = Stop("interrupted", 7, f"stopped by the test at step {step.number}")

    def end(self, loop) -> None:
        self.ended = loop.status


def test_a_hook_sees_every_step_and_its_stop_request_is_checkpointed(tmp_path, capsys):
    trainer = make_trainer(tmp_path, steps=8, eval_every=0, checkpoint_every=0, log_every=2)
    run = RunDir.create(tmp_path / "runs", "hooked", "{}\n", {})
    logging = LoggingSpec(runs_dir=str(tmp_path / "runs"), progress=False, plots=False)
    hook = StopAfter(3)
    hooks = standard_hooks(trainer, logging=logging, sample=SampleSpec(enabled=False), tokenizer=None,
                           name="hooked")
    assert any(isinstance(h, CheckpointHook) for h in hooks)
    result = TrainingLoop(trainer, run, [hook, *hooks], logging=logging)("start")
    assert hook.seen == [(1, 8), (2, 8), (3, 8)] and hook.ended == "interrupted"
    assert (result.status, result.exit_code, result.step) == ("interrupted", 7, 3)
    verify_checkpoint(run.checkpoints.root / "step_000003")
    assert [r["step"] for r in read_rows(run / RunDir.METRICS) if r["kind"] == "train"] == [1, 2]
    assert "stopped by the test at step 3" in capsys.readouterr().err
    assert run.meta()["status"] == "interrupted"
