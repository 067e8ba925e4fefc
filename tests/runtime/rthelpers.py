"""Helpers of the runtime tests: tiny blueprints, single-process runs, torchrun launches, trainers."""
from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from trainhelpers import REPO, make_corpus, private_env, run_dirs, subprocess_env, tiny_raw  # noqa: E402

CONSTANT = {"kind": "constant", "warmup_steps": 2}   # the LR does not depend on train.steps (resume tests)


def dense_raw(tmp: Path) -> dict:
    """Tiny dense GPT, 10 steps, no dropout, 2 accumulation micro-steps (gradient sync on the last)."""
    raw = tiny_raw(tmp)
    raw["model"]["dropout"] = 0.0
    raw["train"].update({"steps": 10, "batch_size": 4, "grad_accum": 2, "eval_every": 5, "checkpoint_every": 5,
                         "eval_steps": 2, "schedule": dict(CONSTANT)})
    return raw


def moe_raw(tmp: Path) -> dict:
    """Tiny MoE GPT: sigmoid router with bias balancing (no aux loss), dropless."""
    raw = tiny_raw(tmp, moe=True)
    raw["model"]["dropout"] = 0.0
    raw["model"]["block"]["mlp"].update({"capacity_factor": None, "lb_loss_coef": 0.0, "z_loss_coef": 0.001,
                                         "router": {"kind": "sigmoid", "bias_update_speed": 0.01}})
    raw["train"].update({"steps": 10, "batch_size": 4, "grad_accum": 2, "eval_every": 5, "checkpoint_every": 5,
                         "eval_steps": 2, "schedule": dict(CONSTANT)})
    return raw


def moe_lb_raw(tmp: Path) -> dict:
    """Tiny MoE GPT as moe_gpt.yaml routes: softmax top-2, batch load-balancing loss and z-loss."""
    raw = moe_raw(tmp)
    raw["model"]["block"]["mlp"].update({"lb_loss_coef": 0.5, "lb_loss_type": "batch", "z_loss_coef": 0.01,
                                         "router": {"kind": "topk", "renormalize": True}})
    return raw


def write(tmp: Path, raw: dict, name: str) -> Path:
    import yaml
    if not (tmp / "corpus.txt").exists():
        make_corpus(tmp / "corpus.txt")
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def rows(run: Path, kind: str | None = None) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in out if kind is None or r["kind"] == kind]


def losses(run: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["kind"], r["loss"] if r["kind"] == "train" else r["val_loss"]) for r in rows(run)]


def assert_same_losses(got: list, want: list, rel: float) -> None:
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    worst = max(abs(a - b) / abs(b) for (_, _, a), (_, _, b) in zip(got, want))
    assert worst <= rel, f"largest relative loss difference {worst:.2e} > {rel:.0e}"


def run_steps(trainer, n: int) -> tuple[list[float], list[int]]:
    """``n`` optimizer steps: the training losses and, after each step, the graphs torch.compile has made."""
    from nanodecoder.runtime import graphs_compiled
    losses, graphs = [], []
    for _ in range(n):
        losses.append(trainer.step().loss.item())
        graphs.append(graphs_compiled())
    return losses, graphs


def assert_close(got: list[float], want: list[float], rel: float, what: str = "compiled vs eager") -> None:
    worst = max(abs(x - y) / abs(y) for x, y in zip(got, want))
    assert worst <= rel, f"{what}: largest relative loss difference {worst:.2e} ({got} vs {want})"


def train_in_process(blueprint: Path, runs: Path, *extra: str) -> Path:
    from nanodecoder.cli.run import main
    assert main([str(blueprint), "--set", f"logging.runs_dir={runs}", *extra]) == 0
    (run,) = run_dirs(runs)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, *args: str, nproc: int = 2, timeout: int = 240,
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N ARGS`` in ``tmp`` (CPU, gloo)."""
    env = subprocess_env(tmp)
    env.update(private_env(tmp), **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``tmp`` with the tests' environment; asserts it exits 0."""
    env = subprocess_env(tmp)
    env.update(private_env(tmp))
    res = subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def resume_copy(tmp: Path, run: Path, name: str) -> Path:
    """A copy of an 8-step run folder under ``tmp/name`` whose last checkpoint is step 4 (step 8 removed)."""
    import shutil
    dst = tmp / name / run.name
    shutil.copytree(run, dst)
    shutil.rmtree(dst / "ckpt" / "step_000008")
    (dst / "ckpt" / "latest").write_text("step_000004")
    return dst


def trainer_for(tmp: Path, raw: dict, **runtime):
    """(Trainer, Runtime) of ``raw`` built the way ``nanodecoder.run`` builds them, with runtime overrides."""
    from nanodecoder.cli.catalog import catalog
    from nanodecoder.config.declare import build
    from nanodecoder.data import DataSpec, prepare_data
    from nanodecoder.model import build_model, build_model_spec
    from nanodecoder.runtime import RuntimeSpec, setup_runtime
    from nanodecoder.train.spec import TrainSpec
    from nanodecoder.train.trainer import Trainer, seed_everything
    raw = copy.deepcopy(raw)
    if not (tmp / "corpus.txt").exists():
        make_corpus(tmp / "corpus.txt")
    prep = prepare_data(build(DataSpec, raw["data"], catalog()), base_dir=tmp, progress=False)
    rt = setup_runtime(build(RuntimeSpec, {"profile": "cpu", **runtime}))
    spec = build(TrainSpec, raw["train"], catalog())
    seed_everything(spec.seed)
    mspec = build_model_spec(raw["model"], prep.tokenizer.vocab_size)
    model = rt.apply(build_model(mspec, seed=spec.seed))
    return Trainer(model, spec, rt, prep, context_length=mspec.context_length), rt
