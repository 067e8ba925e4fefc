"""Every registered kind of every category: the built-ins of each package, then the plug-ins.

Each package lists its own kinds in one ``register(catalog)`` function, one
line per kind; this module only calls them (once per process).  Plug-ins add
theirs through the ``nanodecoder.components`` entry point group.
"""
from __future__ import annotations

import functools

from .. import components, data, finetune, train
from ..config.registry import Catalog, make_catalog


REGISTERS = (components.register, data.register, train.register, finetune.register)


@functools.lru_cache(maxsize=None)
def catalog() -> Catalog:
    """The registries of every category with built-ins and plug-ins loaded."""
    return make_catalog(*REGISTERS)


def builtin_catalog() -> Catalog:
    """The built-in kinds only (what the committed ``schemas/`` describe)."""
    return make_catalog(*REGISTERS, plugins=False)
