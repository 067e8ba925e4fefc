"""Closed registries of named components.

One :class:`Registry` per category (norm, positional, attention, mlp, router,
optimizer, schedule, data_source, tokenizer).  Names come from blueprints; the
objects they map to come only from this package (``nanodecoder/builtins.py``)
or from installed plug-ins that declare a ``nanodecoder.components`` entry
point.  Nothing in a blueprint is ever imported or executed.
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator

ENTRY_POINT_GROUP = "nanodecoder.components"


class RegistryError(Exception):
    """Raised for a duplicate registration or an unknown name."""


def suggest(name: str, choices) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry:
    """A name -> object mapping that refuses duplicates and explains misses."""

    def __init__(self, category: str):
        self.category = category
        self._items: dict[str, Any] = {}
        self._origin: dict[str, str] = {}

    def add(self, name: str, obj: Any, *, origin: str = "nanodecoder") -> Any:
        if name in self._items:
            raise RegistryError(
                f"{self.category} '{name}' is already registered (by {self._origin[name]}); "
                f"pick another name for the component from {origin}")
        self._items[name] = obj
        self._origin[name] = origin
        return obj

    def register(self, name: str, *, origin: str = "nanodecoder") -> Callable[[Any], Any]:
        def deco(obj):
            return self.add(name, obj, origin=origin)
        return deco

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


CATEGORIES = ("norm", "positional", "attention", "mlp", "router",
              "optimizer", "schedule", "data_source", "tokenizer", "finetune")

REGISTRIES: dict[str, Registry] = {c: Registry(c) for c in CATEGORIES}

_loaded = False


def registries() -> dict[str, Registry]:
    """All registries with built-ins and plug-ins loaded (once per process)."""
    global _loaded
    if not _loaded:
        _loaded = True
        from . import builtins  # noqa: F401  (registers every built-in, in one place)
        builtins.register_all(REGISTRIES)
        load_plugins(REGISTRIES)
    return REGISTRIES


def get(category: str, name: str) -> Any:
    return registries()[category].get(name)


def load_plugins(regs: dict[str, Registry]) -> list[str]:
    """Call every ``nanodecoder.components`` entry point with the registries.

    A plug-in's entry point names a function ``register(registries)`` that adds
    its components (each component class carries ``PARAMS_SCHEMA`` so its YAML
    parameters are validated like the built-ins').
    """
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        hook = ep.load()
        before = {c: set(r.names()) for c, r in regs.items()}
        hook(regs)
        loaded.append(ep.name)
        for c, r in regs.items():
            for n in set(r.names()) - before[c]:
                r._origin[n] = f"plug-in '{ep.name}'"
    return loaded
