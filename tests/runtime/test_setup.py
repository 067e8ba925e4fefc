"""Resolving a profile on a machine: hardware checks before training, the dry-run plan, MFU, precisions."""
from __future__ import annotations

import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanodecoder.cli.run import main
from nanodecoder.runtime import (Launch, Runtime, RuntimeSetupError, RuntimeSpec, calibrate_cpu, describe_plan,
                                 gpu_peak_flops, resolve_profile, setup_runtime)
from nanodecoder.runtime.hardware import peak_flops, pick_device, pick_precision
from rthelpers import dense_raw, rows, subprocess_env, trainer_for, write

CUDA_PROFILES = ["gpu", "gpu_mixed", "multi_gpu_compile", "fsdp"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("name", CUDA_PROFILES)
def test_cuda_profiles_are_planned_by_dry_run_and_refused_before_training(tmp_path, capsys, name):
    bp = write(tmp_path, dense_raw(tmp_path), "bp.yaml")
    assert main([str(bp), "--dry-run", "--profile", name]) == 2           # the plan, then training's refusal
    captured = capsys.readouterr()
    out = captured.out
    assert f"error: runtime profile '{name}' (device cuda) needs a CUDA GPU" in captured.err
    assert f"runtime profile '{name}':" in out
    assert "order          device -> precision -> activation checkpointing -> compile -> data-parallel wrap" in out
    assert "memory plan per process: precision" in out and "cannot be checked against the device here" in out
    assert f"on this machine: cannot run: runtime profile '{name}' (device cuda) needs a CUDA GPU" in out
    assert main([str(bp), "--profile", name, "--set", f"logging.runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: runtime profile '{name}' \(device cuda\) needs a CUDA GPU, but CUDA is not "
                        r"available on this machine \(.*\); use --profile cpu, or runtime.profile: auto\n", err)
    assert not (tmp_path / "runs").exists()                 # refused before a run folder or any training


def test_dry_run_of_the_cpu_profile_shows_overrides(tmp_path, capsys):
    bp = write(tmp_path, dense_raw(tmp_path), "bp.yaml")
    assert main([str(bp), "--dry-run", "--set", "runtime.compile=true", "runtime.precision=mixed"]) == 0
    out = capsys.readouterr().out
    assert "runtime profile 'cpu'" in out and "compile (default)*" in out and "precision mixed*" in out
    assert "on this machine: cpu, bf16, one process (under torchrun: ddp)" in out
    with pytest.raises(SystemExit):
        main([str(bp), "--profile", "gpux"])
    assert "invalid choice: 'gpux'" in capsys.readouterr().err


class FakeGPU:
    """Monkeypatches torch.cuda to describe one GPU (name, compute capability, bf16 support)."""

    def __init__(self, monkeypatch, name: str, capability: tuple[int, int], count: int = 1):
        for attr, value in {"is_available": lambda: True, "device_count": lambda: count,
                            "get_device_name": lambda d=None: name,
                            "get_device_capability": lambda d=None: capability,
                            "is_bf16_supported": lambda including_emulation=True: capability >= (8, 0)}.items():
            monkeypatch.setattr(torch.cuda, attr, value)


def test_bf16_on_a_gpu_without_bf16_names_the_profile_to_use(monkeypatch):
    FakeGPU(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0))
    dev = torch.device("cuda", 0)
    with pytest.raises(RuntimeSetupError, match=r"runtime.precision 'bf16' needs a GPU with bf16 .* Tesla V100-SXM2"
                                                r"-16GB has 7.0; use --profile gpu_mixed \(fp16 with loss scaling"):
        pick_precision(resolve_profile(RuntimeSpec(profile="gpu", precision="bf16")), dev)
    assert pick_precision(resolve_profile(RuntimeSpec(profile="gpu_mixed")), dev) == "fp16"
    plan = describe_plan(RuntimeSpec(profile="gpu_mixed"), env={})
    assert "on this machine: cuda:0, fp16 with a GradScaler, one process" in plan
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    fsdp = describe_plan(RuntimeSpec(profile="fsdp"), env=torchrun)
    assert "cannot run: FSDP with fp16 loss scaling is not supported" in fsdp


@pytest.mark.parametrize("amx,avx512_bf16", [(True, False), (False, True), (False, False)])
def test_auto_precision_takes_bf16_only_where_its_matmuls_are_fast(monkeypatch, amx, avx512_bf16):
    import nanodecoder.runtime.hardware as hw
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    want = "bf16" if amx or avx512_bf16 else "fp32"
    cpu = resolve_profile(RuntimeSpec(profile="cpu", precision="auto"))
    assert pick_precision(cpu, torch.device("cpu")) == want
    assert f"on this machine: cpu, {want}, one process" in describe_plan(RuntimeSpec(precision="auto"), env={})
    assert hw.planned_precision("auto", "cpu") == want and hw.planned_precision("fp16", "cpu") == "fp16"
    assert setup_runtime(RuntimeSpec(profile="cpu", precision="auto"), env={}).describe().endswith(
        f"{want} (precision auto)")
    FakeGPU(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0))
    assert pick_precision(resolve_profile(RuntimeSpec(profile="gpu", precision="auto")), torch.device("cuda", 0)) \
        == "fp32"
    FakeGPU(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert pick_precision(resolve_profile(RuntimeSpec(profile="gpu", precision="auto")), torch.device("cuda", 0)) \
        == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hw.planned_precision("auto", "cuda") == "bf16"        # planning a GPU run on a machine without one


def test_gpu_devices_follow_torchrun_local_rank(monkeypatch):
    FakeGPU(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), count=2)
    gpu = resolve_profile(RuntimeSpec(profile="gpu_mixed"))
    assert pick_device(gpu, Launch(rank=3, local_rank=1, world_size=4)) == torch.device("cuda", 1)
    assert pick_precision(gpu, torch.device("cuda", 1)) == "bf16"
    with pytest.raises(RuntimeSetupError, match="LOCAL_RANK 2 has no GPU: this node shows 2; use torchrun "
                                                "--nproc_per_node=2"):
        pick_device(gpu, Launch(rank=2, local_rank=2, world_size=4))
    with pytest.raises(RuntimeSetupError, match="names one GPU, but torchrun started 2 processes"):
        pick_device(resolve_profile(RuntimeSpec(profile="gpu", device="cuda:1")), Launch(0, 0, 2))
    with pytest.raises(RuntimeSetupError, match=r"'cuda:5' does not exist: this machine shows 2 GPUs"):
        pick_device(resolve_profile(RuntimeSpec(profile="gpu", device="cuda:5")), Launch())
    assert peak_flops(gpu, torch.device("cuda", 0), "bf16") == (989.5e12, "NVIDIA H100 80GB HBM3 datasheet, dense bf16")


def test_tf32_switch_keeps_the_matmul_precision_readable_for_inductor():
    from nanodecoder.runtime.hardware import set_tf32
    try:
        set_tf32(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"        # inductor reads this; must not raise
        assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # CPU matmuls stay fp32
    finally:
        set_tf32(torch.device("cuda", 0), False)
    assert torch.get_float32_matmul_precision() == "highest"
    set_tf32(torch.device("cpu"), True)                                # no-op off CUDA
    assert not torch.backends.cuda.matmul.allow_tf32


FAULTS = """
import resource, sys, torch
from nanodecoder.runtime import RuntimeSpec, setup_runtime
rt = setup_runtime(RuntimeSpec(profile="cpu", threads=1, peak_flops=1e9, cache_host_memory=sys.argv[1] == "on"))
x, w = torch.randn(4096, 192), torch.randn(192, 2048, requires_grad=True)
def step():                                        # an MLP's forward and backward: 32 MiB activations
    torch.nn.functional.gelu(x @ w).sum().backward()
for _ in range(8):                                 # the heap grows to the steps' high-water mark
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(rt.host_memory_cached, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


RETAINED = """
import sys, torch
from nanodecoder.runtime import RuntimeSpec, setup_runtime
if sys.argv[1] != "untouched":
    setup_runtime(RuntimeSpec(profile="cpu", threads=1, peak_flops=1e9, cache_host_memory=sys.argv[1] == "on"))
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
base = rss_mib()
for _ in range(3):                                   # large blocks freed: glibc's own mmap threshold rises
    big = torch.ones(4 << 20); del big               # 16 MiB
parts = [torch.ones(2 << 20) for _ in range(8)]      # 8 x 8 MiB, then all freed but the last
last = parts[-1]; del parts
print(rss_mib() - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_uncached_host_memory_goes_back_to_the_system(tmp_path):
    """cache_host_memory: false gives freed large blocks back (the resident memory follows the live tensors,
    as the memory plan counts them); glibc left to itself keeps them (the control), caching keeps them on
    purpose."""
    def retained(setting: str) -> int:
        return int(subprocess.run([sys.executable, "-c", RETAINED, setting], capture_output=True, text=True,
                                  check=True, cwd=tmp_path, env=subprocess_env(tmp_path)).stdout)
    assert retained("off") < 24                 # the 8 MiB still held, and little else
    assert retained("untouched") > 40           # glibc's drifting threshold: the freed 56 MiB stay resident
    assert retained("on") > 40


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_cached_host_memory_spares_the_page_faults_of_fresh_tensors(tmp_path):
    def faults(setting: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True,
                             cwd=tmp_path, env=subprocess_env(tmp_path)).stdout.split()
        return out[0], int(out[1])
    cached, with_cache = faults("on")
    plain, without = faults("off")
    assert (cached, plain) == ("True", "False")
    assert without > 10_000            # 3 x 8,192 pages of 4 KiB, faulted in again on every allocation
    assert with_cache < without / 4    # the heap's pages are reused (0 once it has grown; fragmentation varies)
    assert resolve_profile(RuntimeSpec(profile="cpu")).cache_host_memory
    assert not resolve_profile(RuntimeSpec(profile="gpu")).cache_host_memory


def test_launch_environment_errors():
    assert Launch.from_env({}) == Launch(0, 0, 1)
    assert Launch.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
                            "MASTER_PORT": "1"}) == Launch(2, 0, 4, 4)     # no LOCAL_WORLD_SIZE: one node
    with pytest.raises(RuntimeSetupError, match="start distributed runs with torchrun, e.g. torchrun "
                                                "--nproc_per_node=2"):
        Launch.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeSetupError, match="RANK 2 / WORLD_SIZE 2 is not a valid process"):
        Launch.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_peak_flops_table_and_cpu_calibration():
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert gpu_peak_flops("NVIDIA A100 80GB PCIe", "fp32", tf32=False) == 19.5e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16", tf32=True) == 756.5e12
    assert gpu_peak_flops("NVIDIA H200", "fp16", tf32=False) == 989.5e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 3090 Ti", "bf16", tf32=True) == 80e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", "fp32", tf32=True) == 82.6e12
    assert gpu_peak_flops("Tesla T4", "fp16", tf32=False) is None
    first = calibrate_cpu("fp32", torch.get_num_threads())
    assert 1e8 < first < 1e14 and calibrate_cpu("fp32", torch.get_num_threads()) == first   # cached
    rt = setup_runtime(RuntimeSpec(profile="cpu", peak_flops=2.0e11))
    assert (rt.peak_flops, rt.peak_source) == (2.0e11, "runtime.peak_flops")
    assert Runtime(torch.device("cpu"), world_size=2, peak_flops=1e11).mfu(1000.0, 5e7) == (5e10, 0.25)
    assert Runtime(torch.device("cpu")).mfu(1000.0, 5e7) == (5e10, None)


def test_global_batch_must_split_over_the_processes():
    rt = Runtime(torch.device("cpu"), world_size=4)
    assert rt.local_batch(8) == 2
    with pytest.raises(RuntimeSetupError, match=r"train.batch_size \(6\) is the global batch and must split evenly "
                                                r"over the 4 processes; use a multiple of 4 \(e.g. 4 or 8\)"):
        rt.local_batch(6)
    with pytest.raises(RuntimeSetupError, match=r"use a multiple of 4 \(e.g. 4\)$"):
        rt.local_batch(1)


def test_metrics_report_model_flops_and_mfu(reference, workdir):
    from nanodecoder.model.plan import flops_per_token
    trainer, rt = trainer_for(workdir, dense_raw(workdir))
    assert trainer.flops_per_token == flops_per_token(trainer.raw_model) > 0
    train = rows(reference["dense"], "train")
    for r in train:
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * trainer.flops_per_token)
        assert 0 < r["mfu"] < 1           # against this CPU's calibrated fp32 matmul peak


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    raw = dense_raw(tmp_path)
    fp32, _ = trainer_for(tmp_path, raw)
    bf16, rt = trainer_for(tmp_path, raw, precision="bf16")
    assert rt.precision == "bf16" and rt.scaler is None and "bf16" in rt.describe()
    with rt.autocast():
        x, _ = rt.to_device(bf16.sampler.next_batch())
        assert bf16.model(x).logits.dtype == torch.bfloat16
    a = [fp32.step().loss.item() for _ in range(4)]
    b = [bf16.step().loss.item() for _ in range(4)]
    assert all(math.isfinite(v) for v in b) and b[-1] < b[0]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.05       # same run, bf16 rounding only


def test_fp16_uses_a_grad_scaler_that_skips_overflowing_steps(tmp_path):
    trainer, rt = trainer_for(tmp_path, dense_raw(tmp_path), precision="fp16")
    assert rt.scaler is not None and rt.scales_loss and "GradScaler" in rt.describe()
    assert all(math.isfinite(trainer.step().loss.item()) for _ in range(3))
    rt.scaler.update(2.0 ** 120)          # force an overflow: the scaled gradients become inf
    before = [p.detach().clone() for p in trainer.params]
    out = trainer.step()                  # not a NonFiniteLoss: the scaler skips the step and backs off
    assert math.isfinite(out.loss.item()) and not out.skipped
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert rt.scaler.get_scale() < 2.0 ** 120
    saved = trainer.state_dict()["runtime"]["grad_scaler"]
    assert saved["scale"] == rt.scaler.get_scale()
    again, rt2 = trainer_for(tmp_path, dense_raw(tmp_path), precision="fp16")
    again.load_state_dict(trainer.state_dict())
    assert rt2.scaler.get_scale() == rt.scaler.get_scale()


def test_trainer_loop_and_checkpoints_do_not_branch_on_the_device():
    root = Path(__file__).resolve().parents[2] / "nanodecoder" / "train"
    for name in ("trainer.py", "loop.py", "checkpoint.py"):
        text = (root / name).read_text()
        for needle in ("is_cuda", "device.type", "torch.cuda", "torch.distributed"):
            assert needle not in text, f"{name} uses {needle}; ask the runtime instead"
