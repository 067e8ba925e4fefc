"""``runtime.expert_parallel`` wired into a training run (issue 27, phase 2, DDP): two processes splitting
the experts train exactly as two DDP processes holding every expert (losses, final weights, optimizer state,
samples), resume from a DDP checkpoint, and refuse what they cannot do with one line (exit 2).

Marked ``distributed``: the runs launch ``python -m torch.distributed.run --nproc_per_node=2`` (gloo).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rthelpers import assert_same_losses, moe_lb_raw, rows, run_dirs, torchrun, write

pytestmark = pytest.mark.distributed
REL = 1e-5


def _ep_raw(tmp):
    """Tiny MoE (d_model 32, 2 layers, 4 experts, context 16, global batch 4): softmax top-2 with the batch
    load-balancing loss and z-loss (global over ranks), gradient clipping, 2 accumulation micro-steps."""
    raw = moe_lb_raw(tmp)
    raw["train"].update({"steps": 8, "eval_every": 4, "checkpoint_every": 4, "grad_clip": 0.05})
    raw["logging"]["progress"] = False
    raw["eval"] = {"text": {"data": "held_out.txt", "every": 4, "batch_size": 3}}   # forwards on every rank
    return raw


def _numbers(run) -> list[tuple[int, str, float]]:
    """``(step, name, value)`` of the train loss, the validation loss and the periodic text eval's loss."""
    return [(r["step"], k, r[k]) for r in rows(run) for k in ("loss", "val_loss", "text_loss") if k in r]


@pytest.fixture(scope="module")
def ep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep_run")
    write(tmp, _ep_raw(tmp), "ep_moe.yaml")
    (tmp / "held_out.txt").write_text("a held-out text of a few words, read in windows of the context. " * 3)
    return tmp


def _launch(tmp, runs: str, *extra: str):
    res = torchrun(tmp, "-m", "nanodecoder.run", "ep_moe.yaml", "--profile", "cpu",
                   "--set", f"logging.runs_dir={runs}", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = run_dirs(tmp / runs)
    return run, res


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=REL, atol=REL), (what, k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), (what, k)


@pytest.fixture(scope="module")
def ddp_run(ep_dir):
    return _launch(ep_dir, "ddp", "--set", "runtime.expert_parallel=1")


def test_expert_parallel_trains_as_ddp(ep_dir, ddp_run):
    ddp, _ = ddp_run
    ep, res = _launch(ep_dir, "ep", "--set", "runtime.expert_parallel=2", "--set", "train.steps=8",
                      "--set", "train.checkpoint_format=full")       # the full files, compared with DDP's
    assert "experts split: ep 2 x dp 1" in res.stdout
    assert_same_losses(_numbers(ep), _numbers(ddp), REL)          # train and eval rows, steps 1..8
    assert len(_numbers(ep)) == 8 + 2 + 2
    norms = [(r["grad_norm"], w["grad_norm"]) for r, w in zip(rows(ep, "train"), rows(ddp, "train"))]
    assert len(norms) == 8 and all(abs(a - b) <= REL * b for a, b in norms), norms   # the global norm
    last = "step_000008"
    _assert_same_tensors(load_file(str(ep / "ckpt" / last / "model.safetensors")),
                         load_file(str(ddp / "ckpt" / last / "model.safetensors")), "weights")
    _assert_same_tensors(load_file(str(ep / "ckpt" / last / "state.safetensors")),   # full optimizer state
                         load_file(str(ddp / "ckpt" / last / "state.safetensors")), "training state")
    assert (ep / "samples.txt").read_text() == (ddp / "samples.txt").read_text()  # sampled on every rank
    # the parameter count is the whole model's, not one rank's experts
    def count(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.strip().startswith("params ")]
    assert count(res.stdout) and count(res.stdout) == count(ddp_run[1].stdout)


def test_expert_parallel_resumes_a_ddp_checkpoint(ep_dir, ddp_run):
    ddp, _ = ddp_run
    want = _numbers(ddp)
    resumed = ep_dir / "resumed"
    shutil.copytree(ddp, resumed / "copy" / ddp.name)
    run = resumed / "copy" / ddp.name
    res = torchrun(ep_dir, "-m", "nanodecoder.run", "--resume", str(run), "--checkpoint", "step_000004",
                   "--set", "runtime.expert_parallel=2", "train.checkpoint_format=full")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_losses(_numbers(run), want, REL)           # steps 5..8 continue from the sliced weights and moments
    _assert_same_tensors(load_file(str(run / "ckpt" / "step_000008" / "model.safetensors")),
                         load_file(str(ddp / "ckpt" / "step_000008" / "model.safetensors")), "resumed weights")


INSTRUMENTED = Path(__file__).with_name("instrumented_run.py")


def test_muon_on_the_experts_updates_split_experts_as_whole_ones(ep_dir):
    """Muon orthogonalises each expert's matrix on its own, so a rank holding half the experts gives them the
    update DDP gives them. Newton-Schulz runs in float64 here (the instrument): in bfloat16 a gradient that
    differs in its last float32 bit (the all-to-all's reduction order) flips roundings of the update, each
    moving a weight by ~lr x 2^-9 (measured: 1.2e-3 after 4 steps), which would hide a real error of that
    size; in float64 the two layouts agree to 1.2e-7."""
    raw = copy.deepcopy(_ep_raw(ep_dir))
    raw["train"].update({"steps": 4, "eval_every": 0, "checkpoint_every": 4, "grad_clip": 1.0})
    raw["train"]["optimizer"] = {"kind": "muon", "newton_schulz": "batched",
                                 "rules": [{"roles": ["expert"], "optimizer": "muon"}]}
    raw.pop("eval")
    write(ep_dir, raw, "ep_muon.yaml")
    out = {}
    for ep in (1, 2):
        res = torchrun(ep_dir, str(INSTRUMENTED), "ep_muon.yaml", "--profile", "cpu",
                       "--set", f"logging.runs_dir=muon_ep{ep}", f"runtime.expert_parallel={ep}",
                       "train.checkpoint_format=full", env_extra={"NEWTON_SCHULZ_FP64": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        (run,) = run_dirs(ep_dir / f"muon_ep{ep}")
        out[ep] = run
    assert_same_losses(_numbers(out[2]), _numbers(out[1]), REL)
    for name in ("model", "state"):      # the weights, and the experts' momentum buffers sliced and put back
        _assert_same_tensors(load_file(str(out[2] / "ckpt" / "step_000004" / f"{name}.safetensors")),
                             load_file(str(out[1] / "ckpt" / "step_000004" / f"{name}.safetensors")), name)


def _one_line_refusal(res, *parts: str) -> None:
    """The ranks exit 2 (torchrun then exits 1 and may stop the slower rank first) with one line naming the key,
    no traceback."""
    assert res.returncode != 0 and "exitcode  : 2" in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "runtime.expert_parallel" in line]
    assert lines and "nanodecoder/" not in res.stderr, res.stderr[-3000:]   # torchrun's own traceback only
    assert all(p in lines[0] for p in parts), lines


def test_refuses_a_degree_that_does_not_divide_the_processes(ep_dir, capsys):
    from nanodecoder.cli.run import main
    assert main([str(ep_dir / "ep_moe.yaml"), "--set", "runtime.expert_parallel=2",
                 f"logging.runs_dir={ep_dir / 'refused'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("runtime.expert_parallel: 2 must divide the number of processes (1)" in line for line in err), err
    assert not (ep_dir / "refused").exists()


def test_composes_with_fsdp_and_ddp_but_checks_the_degree(ep_dir, monkeypatch):
    """Both data-parallel wraps take split experts (test_fsdp_expert_parallel.py trains EP 2 x FSDP 2)."""
    from nanodecoder.runtime import RuntimeSpec
    from nanodecoder.runtime.setup import resolve_target
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert resolve_target(RuntimeSpec(profile="cpu", data_parallel="fsdp", expert_parallel=2), env).problem is None
    assert resolve_target(RuntimeSpec(profile="cpu", expert_parallel=2), env).problem is None
    target = resolve_target(RuntimeSpec(profile="cpu", data_parallel="fsdp", expert_parallel=4), env)
    assert target.problem.startswith("runtime.expert_parallel: 4 must divide the number of processes (2)")


@pytest.mark.parametrize("change, parts", [
    ({"n_experts": 3}, ("2 must divide", "n_experts (3)")),
    ({"kind": "gelu"}, ("needs a model with MoE layers",)),
])
def test_refuses_a_model_it_cannot_split(ep_dir, change, parts):
    raw = copy.deepcopy(_ep_raw(ep_dir))
    mlp = raw["model"]["block"]["mlp"]
    mlp.update(change)
    if mlp["kind"] == "gelu":
        raw["model"]["block"]["mlp"] = {"kind": "gelu"}
    name = f"refuse_{next(iter(change))}.yaml"
    write(ep_dir, raw, name)
    res = torchrun(ep_dir, "-m", "nanodecoder.run", name, "--set", "runtime.expert_parallel=2",
                   "--set", f"logging.runs_dir=refused_{next(iter(change))}")
    _one_line_refusal(res, *parts)
