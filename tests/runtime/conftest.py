"""Fixtures of the runtime tests (CPU only).  Distributed tests start
``python -m torch.distributed.run --nproc_per_node=2`` (gloo) as a subprocess;
tests marked ``compile`` run torch.compile (inductor, C++) on tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rthelpers import dense_raw, moe_lb_raw, moe_raw, private_env, train_in_process, write


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile (inductor needs a C++ compiler; slow on 2 cores)")
    config.addinivalue_line("markers", "distributed: launches 2 processes with torchrun (gloo on the CPU)")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runtime")
    write(tmp, dense_raw(tmp), "dense.yaml")
    write(tmp, moe_raw(tmp), "moe.yaml")
    write(tmp, moe_lb_raw(tmp), "moe_lb.yaml")
    return tmp


@pytest.fixture(scope="session")
def reference(workdir):
    """Single-process runs of dense.yaml and moe.yaml (their run dirs), made once."""
    saved = dict(os.environ)
    os.environ.update(private_env(workdir))
    try:
        return {name: train_in_process(workdir / f"{name}.yaml", workdir / f"ref_{name}") for name in ("dense", "moe", "moe_lb")}
    finally:
        os.environ.clear()
        os.environ.update(saved)
