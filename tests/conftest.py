"""Fixtures shared across test folders: one tiny trained run that read-only tests reuse."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import private_env, train_tiny  # noqa: E402


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
