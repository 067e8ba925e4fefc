"""Fixtures of the training-run tests: a private data cache (the shared tiny run is in tests/conftest.py)."""
from __future__ import annotations

import pytest

from trainhelpers import private_env


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test prepares data into one session-private cache (never the user's)."""
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)
