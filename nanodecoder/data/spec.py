"""The ``data:`` section, declared: a source kind, a tokenizer kind and the sampling mode.

The kinds come from the closed registries (categories ``data_source`` and
``tokenizer``, see ``data/kinds.py``), never from a path in the blueprint.
"""
from __future__ import annotations

from typing import Literal

from ..config.declare import Kind, choice, declared, param


@declared
class DataSpec:
    """The data section of a blueprint: where the text comes from (source), how it becomes token ids (tokenizer)
    and how training batches are drawn (sampling). Prepared tokens are cached under $NANODECODER_CACHE."""
    source: Kind = choice("data_source", doc="Where the raw text comes from; 'kind' picks the source and its "
                                             "parameters.")
    tokenizer: Kind = choice("tokenizer", doc="How text becomes token ids; 'kind' picks the tokenizer and its "
                                              "parameters.")
    sampling: Literal["random", "sequential"] = param(
        "random", doc="How training windows are drawn: 'random' picks window starts uniformly (like nanoGPT); "
                      "'sequential' walks epochs over non-overlapping windows in a seeded shuffled order.")

    def check(self):
        why = self.source.impl.tokenizer_problem(self.tokenizer)
        if why:
            yield ("tokenizer",), why
