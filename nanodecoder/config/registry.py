"""Closed registries of named kinds, one per category, and the entry-point plug-ins.

Names come from blueprints; the classes they map to come only from this
package (each package's ``register(catalog)`` lists its built-in kinds, one
line each) or from installed plug-ins that declare a ``nanodecoder.components``
entry point.  Nothing in a blueprint is ever imported or executed.
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator

ENTRY_POINT_GROUP = "nanodecoder.components"

#: category -> what one of its kinds is (the start of its schema description)
CATEGORIES = {
    "norm": "A normalisation layer",
    "positional": "A positional encoding",
    "attention": "An attention layer",
    "mlp": "A feed-forward layer: a dense MLP or a mixture of experts",
    "router": "An MoE router (its maths always runs in fp32)",
    "init": "A weight initialisation scheme",
    "rope_scaling": "A RoPE frequency scaling for longer contexts",
    "optimizer": "An optimizer: 'kind' picks it, the other keys are its parameters",
    "schedule": "A learning-rate schedule: 'kind' picks it, the other keys are its parameters",
    "data_source": "Where the text comes from",
    "tokenizer": "How text becomes token ids",
    "finetune": "A fine-tuning task started from a trained run",
}


class RegistryError(Exception):
    """Raised for a duplicate registration or an unknown name."""


def suggest(name: str, choices) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry:
    """A name -> class mapping that refuses duplicates and explains misses."""

    def __init__(self, category: str):
        self.category = category
        #: what every kind's ``Spec`` must be and provide (a class with ``missing(spec_cls) -> [what lacks]``, set by
        #: the package that defines the category: ``components.contracts``), checked by :meth:`add`
        self.contract: Any = None
        self._items: dict[str, Any] = {}
        self._origin: dict[str, str] = {}

    def add(self, name: str, obj: Any, *, origin: str = "nanodecoder") -> Any:
        if name in self._items:
            raise RegistryError(
                f"{self.category} '{name}' is already registered (by {self._origin[name]}); "
                f"pick another name for the component from {origin}")
        missing = self.contract.missing(getattr(obj, "Spec", None)) if self.contract is not None else []
        if missing:
            raise RegistryError(
                f"{self.category} kind '{name}' (from {origin}) does not meet the {self.category} contract: it lacks "
                f"{'; '.join(missing)} (what the parameter count, the memory plan and the builder ask of every "
                f"{self.category} kind; see {self.contract.__module__}.{self.contract.__name__})")
        self._items[name] = obj
        self._origin[name] = origin
        return obj

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.category} kind '{name}'{suggest(name, self._items)} "
                f"(available: {', '.join(sorted(self._items))})") from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __repr__(self) -> str:
        return f"Registry({self.category!r}, {self.names()})"


Catalog = dict[str, Registry]


def new_catalog() -> Catalog:
    """One empty registry per category."""
    return {c: Registry(c) for c in CATEGORIES}


def make_catalog(*registers: Callable[[Catalog], None], plugins: bool = True) -> Catalog:
    """A catalog filled by each package's ``register`` (built-ins), then by the installed plug-ins."""
    catalog = new_catalog()
    for register in registers:
        register(catalog)
    if plugins:
        load_plugins(catalog)
    return catalog


def signature(catalog: Catalog) -> tuple:
    """What a generated schema depends on: the categories and the names registered in each."""
    return tuple((c, tuple(r.names())) for c, r in catalog.items())


def load_plugins(catalog: Catalog) -> list[str]:
    """Call every ``nanodecoder.components`` entry point with the catalog.

    A plug-in's entry point names a function ``register(catalog)`` that adds
    its classes; each declares its YAML parameters in a ``Spec`` (see
    ``config/declare.py``), validated exactly like the built-ins'.
    """
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        hook = ep.load()
        before = {c: set(r.names()) for c, r in catalog.items()}
        hook(catalog)
        loaded.append(ep.name)
        for c, r in catalog.items():
            for n in set(r.names()) - before[c]:
                r._origin[n] = f"plug-in '{ep.name}'"
    return loaded
