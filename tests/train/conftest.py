"""Fixtures of the training-run tests: a private data cache and one shared tiny run."""
from __future__ import annotations

import os

import pytest

from trainhelpers import private_env, train_tiny


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test prepares data into one session-private cache (never the user's)."""
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny training run (8 steps) shared by the tests that only read its results."""
    saved = dict(os.environ)
    os.environ.update(private_env(tmp_path_factory.getbasetemp()))
    try:
        return train_tiny(tmp_path_factory.mktemp("trained"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
