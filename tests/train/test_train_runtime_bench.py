"""The minimal runtime layer and tools/bench.py."""
from __future__ import annotations

import importlib.util
import platform
import re

import pytest
import torch
from torch import nn

from nanodecoder.config.declare import build
from nanodecoder.runtime import Runtime, RuntimeSetupError, RuntimeSpec, setup_runtime
from trainhelpers import REPO, write_blueprint


def test_cpu_runtime_describes_itself_and_is_a_no_op_wrapper():
    threads = torch.get_num_threads()
    try:
        rt = setup_runtime(RuntimeSpec(profile="cpu", threads=1))
        assert rt.device == torch.device("cpu") and rt.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert rt.is_main and rt.world_size == 1 and rt.precision == "fp32"
    assert rt.host_memory_cached == (platform.libc_ver()[0] == "glibc")       # the cpu profile's cache_host_memory
    cached = ", host memory cached" if rt.host_memory_cached else ""
    assert rt.describe() == f"cpu (1 threads{cached}), fp32"
    with rt.autocast():
        assert torch.ones(2).dtype == torch.float32
    assert rt.peak_memory_bytes() > 0
    inner = nn.Linear(2, 2)
    outer = nn.Module()
    outer.module = nn.Module()
    outer.module._orig_mod = inner
    assert rt.unwrap(outer) is inner and rt.unwrap(inner) is inner
    assert setup_runtime(build(RuntimeSpec, {"device": "cpu"})).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_devices_are_clear_errors(monkeypatch):
    with pytest.raises(RuntimeSetupError, match="CUDA is not available"):
        setup_runtime(RuntimeSpec(device="cuda"))
    with pytest.raises(RuntimeSetupError, match="profile 'cpu' cannot run on device 'cuda:1'"):
        setup_runtime(RuntimeSpec(profile="cpu", device="cuda:1"))
    assert setup_runtime(RuntimeSpec()).device.type == "cpu"      # auto falls back to the CPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeSetupError, match="start distributed runs with torchrun"):
        setup_runtime(RuntimeSpec())


def test_runtime_autocast_for_reduced_precision():
    rt = Runtime(device=torch.device("cpu"), precision="bf16")
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bench_reports_speed_and_memory(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bp = write_blueprint(tmp_path)
    assert bench.main([str(bp), "--steps", "3", "--warmup", "1", "--eval"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"steps 3 \(after 1 warm-up\): [\d.]+ ms/step mean, [\d.]+ median, [\d,]+ tokens/s", out)
    assert "peak memory" in out and "max RSS" in out and "val loss after 4 steps" in out
    assert bench.main([str(bp), "--set", "train.stepz=1"]) == 2


def test_bench_times_random_tokens_without_preparing_data(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bp = write_blueprint(tmp_path)
    (tmp_path / "corpus.txt").unlink()          # nothing to prepare from: --synthetic must not need it
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    assert bench.main([str(bp), "--synthetic", "--vocab", "300", "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny: " in out and re.search(r"steps 2 \(after 1 warm-up\): [\d.]+ ms/step", out)
    assert not (tmp_path / "cache").exists()
    assert bench.main([str(bp), "--synthetic", "--steps", "1"]) == 2      # vocab_size: auto and no --vocab
    assert "give it with --vocab N" in capsys.readouterr().err
    batches = bench.RandomBatches(batch=3, context=5, vocab=7, seed=0)
    x, y = batches.next_batch()
    assert x.shape == y.shape == (3, 5) and int(x.max()) < 7 and torch.equal(x[:, 1:], y[:, :-1])


def test_bench_pair_times_two_variants_of_one_blueprint(tmp_path, capsys):
    """--set-a / --set-b give each side its own overrides, so one blueprint can be compared with a variant."""
    spec = importlib.util.spec_from_file_location("bench_pair", REPO / "tools" / "bench_pair.py")
    bench_pair = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_pair)
    bp = write_blueprint(tmp_path)
    assert bench_pair.main([str(bp), str(bp), "--rounds", "2", "--steps", "1", "--warmup", "1",
                            "--set", "train.batch_size=2", "--set-b", "model.d_model=64"]) == 0
    out = capsys.readouterr().out
    assert "A: tiny\n" in out and "B: tiny with model.d_model=64" in out
    assert re.search(r"A tiny +[\d.]+ ms/step", out) and re.search(r"B tiny +[\d.]+ ms/step", out)
    assert re.search(r"throughput B tiny / A tiny = [\d.]+", out)
    assert bench_pair.main([str(bp), str(bp), "--set-b", "model.d_modl=64"]) == 2       # reaches B only
    captured = capsys.readouterr()
    assert "A: tiny\n" in captured.out and "unknown key 'd_modl'" in captured.err
