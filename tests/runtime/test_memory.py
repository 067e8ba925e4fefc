"""The memory a process may allocate (runtime.hardware) and the run's memory check (train.memory)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanodecoder.cli.blueprint import load_blueprint, run_spec
from nanodecoder.model.plan import Setting, plan
from nanodecoder.runtime import MEMORY_ENV, Launch, Runtime, RuntimeSetupError, RuntimeSpec, available_memory
from nanodecoder.runtime.hardware import cgroup_free, mem_available, parse_bytes
from nanodecoder.train.memory import WontFit, planned_check, refuse_if_too_big, runtime_check

CPU = torch.device("cpu")
GIB = 2 ** 30


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str], available_kb: int = 16 * 2 ** 20) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: 33554432 kB\nMemAvailable: {available_kb} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("80 GB") == 80 * 10 ** 9
    assert parse_bytes("1.5e9") == 1_500_000_000 and parse_bytes("512") == 512
    with pytest.raises(RuntimeSetupError, match="is not a size in bytes"):
        parse_bytes("lots")


def test_the_environment_variable_replaces_the_measurement():
    budget = available_memory(CPU, env={MEMORY_ENV: "3GiB"})
    assert budget.bytes == 3 * GIB and MEMORY_ENV in budget.source


def test_cgroup_v2_limit_below_mem_available(tmp_path):
    root = fake_root(tmp_path, "0::/job\n", {"sys/fs/cgroup/job/memory.max": str(10 * GIB),
                                            "sys/fs/cgroup/job/memory.current": str(4 * GIB),
                                            "sys/fs/cgroup/memory.max": "max",
                                            "sys/fs/cgroup/memory.current": str(5 * GIB)})
    assert mem_available(root) == 16 * GIB and cgroup_free(root) == 6 * GIB
    budget = available_memory(CPU, env={}, root=root)
    assert budget.bytes == 6 * GIB and "cgroup limit" in budget.source


def test_cgroup_v1_and_no_limit(tmp_path):
    root = fake_root(tmp_path / "v1", "4:memory:/\n1:cpu:/\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(64 * GIB),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GIB)})
    assert cgroup_free(root) == 63 * GIB
    assert available_memory(CPU, env={}, root=root).bytes == 16 * GIB          # MemAvailable is smaller
    unlimited = fake_root(tmp_path / "v2", "0::/\n", {"sys/fs/cgroup/memory.max": "max",
                                                      "sys/fs/cgroup/memory.current": "1"})
    assert cgroup_free(unlimited) is None
    assert available_memory(CPU, env={}, root=unlimited).source == "host memory: MemAvailable"


def test_host_memory_is_shared_by_the_processes_of_a_node(tmp_path):
    root = fake_root(tmp_path, "0::/\n", {})
    launch = Launch(rank=1, local_rank=1, world_size=8, local_world_size=4)
    budget = available_memory(CPU, launch, env={}, root=root)
    assert budget.bytes == 4 * GIB and "shared by the 4 processes" in budget.source
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "x",
           "MASTER_PORT": "1"}
    assert Launch.from_env(env).local_world_size == 4


def specs(*overrides):
    spec = run_spec(load_blueprint("dense_gpt", list(overrides)), vocab_size=256)
    return spec.model, spec.train


def test_the_run_plan_is_per_process_and_follows_the_profile():
    model, train = specs("runtime.profile=cpu", "runtime.activation_checkpointing=true", "train.batch_size=8")
    env = {MEMORY_ENV: "100GiB", "WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    check = planned_check(model, train, RuntimeSpec(profile="cpu", data_parallel="fsdp",
                                                    activation_checkpointing=True), env)
    st = check.plan.setting
    assert (st.batch, st.world_size, st.sharded, st.checkpointing, st.device) == (2, 4, True, True, "cpu")
    assert check.fits and check.needed == check.plan.memory(True).total
    whole = plan(model, Setting(context=model.context_length, batch=2)).memory()
    assert check.plan.memory().weights == whole.weights / 4


def test_refusal_names_both_numbers_and_the_override():
    model, train = specs()
    runtime = Runtime(device=CPU)
    with pytest.raises(WontFit) as e:
        refuse_if_too_big(model, train, runtime, env={MEMORY_ENV: "1MiB"})
    message = str(e.value)
    needed = runtime_check(model, train, runtime, env={MEMORY_ENV: "1MiB"}).needed
    assert "the plan needs " in message and "1.00 MiB available" in message and f"{MEMORY_ENV}=1MiB" in message
    assert "--set runtime.check_memory=false" in message and needed > 2 ** 20
    assert refuse_if_too_big(model, train, runtime, env={MEMORY_ENV: "1TiB"}).fits


def test_activation_checkpointing_is_suggested_when_only_the_activations_do_not_fit():
    model, train = specs("train.batch_size=64")
    runtime = Runtime(device=CPU)
    full = runtime_check(model, train, runtime, env={MEMORY_ENV: "1TiB"}).plan
    between = (full.memory(True).total + full.memory(False).total) / 2
    check = runtime_check(model, train, runtime, env={MEMORY_ENV: str(int(between))})
    assert check.fits is False and "--set runtime.activation_checkpointing=true needs" in check.shortfall()


def test_a_gpu_profile_without_cuda_cannot_be_checked_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, train = specs()
    check = planned_check(model, train, RuntimeSpec(profile="gpu_mixed"), env={})
    assert check.fits is None and check.plan.setting.device == "cuda"
    assert "cannot be checked against the device here" in check.report()
