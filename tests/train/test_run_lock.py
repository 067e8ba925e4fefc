"""One writer per run folder: the run lock (``train/rundir.py``), a second trainer refused while the first trains,
readers (sampling) that take no lock and survive a checkpoint pruned or set aside under them, and the lock
freed when its holder is killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainhelpers import run_dirs, subprocess_env, tiny_raw, train_tiny, write_blueprint

from nanodecoder.data import load_tokenizer
from nanodecoder.train.checkpoint import CheckpointError
from nanodecoder.train.rundir import RunDir, RunDirError, RunLock, RunLocked, lock_for_training

HOLD = ("import sys, time\nfrom nanodecoder.train.rundir import RunLock\n"
        "RunLock(sys.argv[1], sys.argv[2]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n")
TIMEOUT = 180        # catches a hang only: nothing here waits for a fixed time


def hold_lock(folder: Path, tmp: Path, doing: str = "trained") -> subprocess.Popen:
    """A process that holds ``folder``'s lock until it is killed (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), doing], env=subprocess_env(tmp),
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()            # "" if it died first
    assert line.strip() == "locked", proc.communicate(timeout=TIMEOUT)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)


# ---- the lock itself ---------------------------------------------------------------------------------------------
def test_the_lock_refuses_another_process_names_it_and_is_freed_when_it_is_killed(tmp_path):
    proc = hold_lock(tmp_path, tmp_path)
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path).acquire()
        assert f"is being trained by process {proc.pid} (since " in str(refused.value)
        assert "wait for it to finish or stop it first" in str(refused.value)
        assert "\n" not in str(refused.value) and isinstance(refused.value, RunDirError)    # exit 2, one line
    finally:
        kill(proc)                             # kill -9: no clean-up ran; the OS dropped the lock
    with RunLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
    with RunLock(tmp_path):                    # released on leaving: this process takes it again
        pass


def test_only_rank_0_takes_the_lock_and_every_rank_gets_its_refusal(tmp_path):
    class Rank:
        def __init__(self, rank: int, rank0_says: str | None = None):
            self.is_main, self.rank0_says, self.sent, self.closed = rank == 0, rank0_says, None, False

        def broadcast_text(self, text: str) -> str:
            self.sent = text
            return text if self.is_main else self.rank0_says

        def close(self) -> None:             # leave the process group (every rank, together)
            self.closed = True

    rank0, rank1 = Rank(0), Rank(1, rank0_says="")
    with lock_for_training(tmp_path, rank0) as lock:
        assert isinstance(lock, RunLock) and rank0.sent == ""        # the others learn: taken
        with lock_for_training(tmp_path, rank1):                      # rank 1 takes nothing (rank 0 holds it)
            pass
        assert not rank0.closed and not rank1.closed
        other0 = Rank(0)
        with pytest.raises(RunLocked) as refused:                     # a second job's rank 0 is refused...
            lock_for_training(tmp_path, other0)
        other1 = Rank(1, rank0_says=str(refused.value))
        with pytest.raises(RunLocked, match="wait for it"):           # ... and so is its rank 1, the same way
            lock_for_training(tmp_path, other1)
        assert other0.sent == str(refused.value) and other0.closed and other1.closed


def test_a_resume_under_torchrun_of_a_run_being_trained_is_refused_without_a_hang(tmp_path):
    """Rank 0 asks for the lock and tells rank 1 (the test above checks that logic; here: gloo, two processes)."""
    import socket
    run = train_tiny(tmp_path)
    before = (run / RunDir.METRICS).read_text()
    proc = hold_lock(run, tmp_path)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}", "-m", "nanodecoder.run", "--resume", str(run)],
                             cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
                             timeout=TIMEOUT)
    finally:
        kill(proc)
    ranks = res.stderr.split("failed (exitcode")[0]           # what the ranks printed, before torchrun's report
    # (torchrun stops the other rank once the first one has exited: how much of it shows is torchrun's timing)
    assert res.returncode != 0 and f"error: {run} is being trained by process {proc.pid} (since " in ranks
    assert "Traceback" not in ranks and "terminate called" not in ranks    # left the process group, no abort
    assert "exitcode  : 2" in res.stderr and "exitcode  : -6" not in res.stderr
    assert (run / RunDir.METRICS).read_text() == before and not (run / "ckpt" / "superseded").exists()


def test_a_folder_where_the_lock_cannot_be_written_is_one_line(tmp_path):
    with pytest.raises(RunDirError, match=r"cannot create the lock file .*missing.*\.lock"):
        RunLock(tmp_path / "missing").acquire()


# ---- readers racing a trainer's save and prune ---------------------------------------------------------------------
def _save_two_more(run: RunDir, model) -> None:
    """What a trainer of the run does meanwhile: two new checkpoints (the newest is the best) and a prune."""
    mgr = RunDir(run.path, keep_checkpoints=2).checkpoints
    with torch.no_grad():
        for step in (12, 16):
            for p in model.parameters():
                p.fill_(step / 100)
            mgr.save(step, model, {"step": step}, best=True)


def reader_module():
    """The module of the function sample, eval and export load a run with (patched where it builds the model)."""
    from nanodecoder.cli.sample import load_run_model
    return sys.modules[load_run_model.__module__]


@pytest.mark.parametrize("which", ["latest", "best"])
def test_sampling_survives_its_checkpoint_pruned_before_it_is_read(tmp_path, monkeypatch, which):
    sample = reader_module()
    run = RunDir(train_tiny(tmp_path))
    assert run.checkpoints.resolve(which).name in ("step_000004", "step_000008")
    build = sample.build_model

    def build_while_training(*args, **kwargs):        # the checkpoint was found; the trainer moves on
        _save_two_more(run, build(*args, **kwargs))
        assert not (run / "ckpt" / "step_000008").exists()
        return build(*args, **kwargs)

    monkeypatch.setattr(sample, "build_model", build_while_training)
    model, _, path, _ = sample.load_run_model(run.path, which)
    assert path.name == "step_000016"
    assert all(torch.all(p == 0.16) for p in model.parameters())


def test_sampling_survives_its_checkpoint_removed_while_it_is_hashed(tmp_path, monkeypatch):
    import nanodecoder.train.checkpoint as ckpt
    sample = reader_module()
    run = RunDir(train_tiny(tmp_path))
    real_sha, calls = ckpt._sha256, []

    def prune_under_the_reader(f):
        calls.append(f)
        if len(calls) == 1:                   # the first file read: the trainer saves twice and prunes it
            vocab = load_tokenizer(run / RunDir.TOKENIZER).vocab_size
            _save_two_more(run, sample.build_model(sample.run_spec(sample.load_blueprint(run / RunDir.BLUEPRINT),
                                                                   vocab).model))
        return real_sha(f)

    monkeypatch.setattr(ckpt, "_sha256", prune_under_the_reader)
    _, _, path, _ = sample.load_run_model(run.path, "latest")
    assert path.name == "step_000016" and calls[0].parent.name == "step_000008"


def test_a_reader_between_set_aside_and_the_new_latest_gets_the_newest_complete_checkpoint(tmp_path):
    run = RunDir(train_tiny(tmp_path))
    mgr = run.checkpoints
    (mgr.root / "superseded").mkdir()
    os.replace(mgr.root / "step_000008", mgr.root / "superseded" / "step_000008")   # latest not yet rewritten
    assert (mgr.root / "latest").read_text().strip() == "step_000008"
    assert mgr.for_reading("latest").name == "step_000004"
    assert mgr.for_reading("best").name == "step_000004"
    with pytest.raises(CheckpointError, match="no 'step_000008' checkpoint"):     # a name asked for is never replaced
        mgr.for_reading("step_000008")


# ---- two processes on one run folder, end to end -------------------------------------------------------------------
def test_a_second_trainer_is_refused_readers_go_on_and_kill_9_frees_the_run(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["model"]["dropout"] = 0.0
    raw["train"].update({"steps": 1_000_000, "log_every": 50, "eval_every": 10, "checkpoint_every": 10,
                         "schedule": {"kind": "constant", "warmup_steps": 2}})
    raw["runtime"].update({"threads": 1, "peak_flops": 1e10})      # one core each, no start-up calibration
    bp = write_blueprint(tmp_path, raw)
    env = subprocess_env(tmp_path)
    with open(tmp_path / "trainer.log", "w") as log:
        trainer = subprocess.Popen([sys.executable, "-m", "nanodecoder.run", str(bp)], cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    others: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(tmp_path.glob("runs/tiny/*/ckpt/latest")):     # its first checkpoint
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        (run,) = run_dirs(tmp_path / "runs")
        assert json.loads((run / RunLock.FILE).read_text())["pid"] == trainer.pid
        second = subprocess.Popen([sys.executable, "-m", "nanodecoder.run", "--resume", str(run)], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reader = subprocess.Popen([sys.executable, "-m", "nanodecoder.sample", str(run), "--max-new-tokens", "5",
                                   "--checkpoint", "latest"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        others += [second, reader]
        out, err = second.communicate(timeout=TIMEOUT)
        assert second.returncode == 2, err[-3000:]
        assert err.strip() == f"error: {run} is being trained by process {trainer.pid} (since " \
                              f"{json.loads((run / RunLock.FILE).read_text())['since']}); wait for it to finish " \
                              "or stop it first"
        out, err = reader.communicate(timeout=TIMEOUT)
        assert reader.returncode == 0, err[-3000:]
        assert f"# {run / 'ckpt' / 'step_'}" in err and out.strip()
        assert trainer.poll() is None                                    # it trained on throughout
    finally:
        for proc in (trainer, *others):
            if proc.poll() is None:
                kill(proc)
    assert not (run / "ckpt" / "superseded").exists()                   # the refused resume moved nothing
    from nanodecoder.cli.run import main
    step = int((run / "ckpt" / "latest").read_text().strip().removeprefix("step_"))
    threads = torch.get_num_threads()
    try:                         # runtime.threads: 1 sets this process's torch threads: the other tests' runs
        assert main(["--resume", str(run), "--set", f"train.steps={step + 3}"]) == 0    # must not inherit it
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((run / RunDir.META).read_text())
    assert meta["status"] == "completed" and meta["step"] == step + 3
    assert json.loads((run / RunLock.FILE).read_text())["pid"] == os.getpid()


# ---- the Hugging Face import writes a run folder too ---------------------------------------------------------------
def test_an_import_into_a_folder_being_written_is_refused_and_a_left_lock_file_is_no_content(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanodecoder.hf import import_hf
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    out.mkdir()
    proc = hold_lock(out, tmp_path, "written")            # another import, still writing
    try:
        with pytest.raises(RunLocked, match=f"{out} is being written by process {proc.pid} "):
            import_hf(tmp_path / "hf", out, tokenizer=False)
        assert [p.name for p in out.iterdir()] == [RunLock.FILE]     # nothing written beside it
    finally:
        kill(proc)
    run = import_hf(tmp_path / "hf", out, tokenizer=False)           # it died: its lock file is no content
    assert run.checkpoints.latest().name == "step_000000"
