"""Registries: closed, duplicate-proof, in agreement with the schemas, open to entry-point plug-ins."""
from pathlib import Path

import pytest

from nanodecoder.cli.catalog import catalog as registries
from nanodecoder.config.registry import Registry, RegistryError
from nanodecoder.config.validate import schema_of
from nanodecoder.cli.blueprint import RunSpec

ROOT = Path(__file__).resolve().parent.parent


def test_duplicate_registration_is_an_error():
    reg = Registry("schedule")
    reg.add("cosine", object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("cosine", object)


def test_unknown_kind_lists_choices_with_a_suggestion():
    with pytest.raises(RegistryError) as e:
        registries()["norm"].get("rmsnrom")
    assert "did you mean 'rmsnorm'?" in str(e.value)
    assert "layernorm, rmsnorm" in str(e.value)


def test_schema_kinds_and_registry_agree_exactly():
    defs = schema_of(RunSpec, registries())["$defs"]
    checked = 0
    for category, reg in registries().items():
        if category not in defs:
            assert not reg.names(), f"registry '{category}' has kinds but no schema block"
            continue
        assert defs[category]["properties"]["kind"]["enum"] == reg.names(), category
        checked += 1
    assert checked == len(registries())


# An entry-point plug-in used from YAML (build, forward/backward, origin, messages, schema entry) is
# tested in test_new_kind.py, the same script that tests a new built-in kind.
