"""A kind's ``context(...)`` must name a field an enclosing section declares: a typo fails loudly, before use."""
from __future__ import annotations

import time

import pytest
import torch

from nanodecoder.api.blueprint import RunSpec
from nanodecoder.api.catalog import REGISTERS
from nanodecoder.components.base import Component
from nanodecoder.components.contracts import AttentionKind, NormKind
from nanodecoder.config.declare import Kind, context, context_problems, declared, param
from nanodecoder.config.registry import RegistryError, make_catalog
from nanodecoder.config.validate import schema_of


def norm_kind(source: str):
    class TypoNorm(Component):
        """A norm that reads its width from the model."""

        @declared
        class Spec(NormKind):
            eps: float = param(1e-6, doc="Epsilon.", exclusive_minimum=0)
            dim: int = context(source)

            @property
            def n_params(self):
                return 0

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, (self.spec.dim,), eps=self.spec.eps)
    return TypoNorm


def catalog_with(kind):
    catalog = make_catalog(*REGISTERS, plugins=False)
    catalog["norm"].add("typo_norm", kind, origin="plug-in 'test'")
    return catalog


def test_every_built_in_hand_down_names_an_enclosing_field():
    start = time.perf_counter()
    assert context_problems(RunSpec, make_catalog(*REGISTERS, plugins=False)) == []
    assert time.perf_counter() - start < 30          # a hang catcher only: the walk is a few ms


def test_a_misspelled_hand_down_is_refused_naming_the_kind_and_the_field():
    catalog = catalog_with(norm_kind("d_modle"))
    problems = context_problems(RunSpec, catalog)
    assert problems and all("norm kind 'typo_norm' (plug-in 'test'): dim = context('d_modle')" in p
                            for p in problems)
    assert "d_model" in problems[0]                       # the fields that are there, to pick from
    with pytest.raises(RegistryError, match="d_modle"):
        schema_of(RunSpec, catalog)


@pytest.mark.parametrize("source", ["d_model", "n_layers"])
def test_a_correct_hand_down_is_accepted(source):
    assert context_problems(RunSpec, catalog_with(norm_kind(source))) == []


def test_a_model_kind_that_does_not_say_its_weights_is_refused_at_registration():
    catalog = make_catalog(*REGISTERS, plugins=False)

    class Weightless(Component):
        """A norm whose spec forgot n_params."""

        @declared
        class Spec(NormKind):
            dim: int = context("d_model")

    with pytest.raises(RegistryError, match=r"norm kind 'weightless' \(from plug-in 'test'\) does not meet the norm "
                                            r"contract: it lacks n_params"):
        catalog["norm"].add("weightless", Weightless, origin="plug-in 'test'")
    assert "weightless" not in catalog["norm"]
    catalog["schedule"].add("any_schedule", Weightless)          # categories without a planner contract take it


def test_a_model_kind_whose_spec_is_not_its_category_contract_is_refused():
    catalog = make_catalog(*REGISTERS, plugins=False)

    class Untyped(Component):
        """A norm whose spec derives from the bare Kind: nothing says what the planner may ask of it."""

        @declared
        class Spec(Kind):
            dim: int = context("d_model")
            n_params = 0

    with pytest.raises(RegistryError, match=r"lacks a Spec deriving from nanodecoder.components.contracts.NormKind"):
        catalog["norm"].add("untyped", Untyped, origin="plug-in 'test'")

    class Bare(Component):
        """An attention kind that says its weights only."""

        @declared
        class Spec(AttentionKind):
            n_params = 0

    with pytest.raises(RegistryError, match=r"attention kind 'bare'.* lacks cache_width; saved_bytes; n_heads, "
                                            r"score_dim, value_dim \(or its own score_flops\)"):
        catalog["attention"].add("bare", Bare, origin="plug-in 'test'")
