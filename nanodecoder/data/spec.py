"""The typed, frozen spec of a blueprint's ``data:`` section.

``DataSpec.from_dict`` turns the validated YAML dict into frozen dataclasses:
``source`` is an instance of the chosen source class's ``Spec`` and
``tokenizer`` of the chosen tokenizer class's ``Spec``.  The classes come
from the closed registries (categories ``data_source`` and ``tokenizer``),
never from a path in the blueprint.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DataError

SAMPLING_MODES = ("random", "sequential")
_SECTION_KEYS = ("source", "tokenizer", "sampling")


def resolve_registries(registries=None) -> dict:
    """The registries given, or the process-wide ones (built-ins and plug-ins)."""
    if registries is not None:
        return registries
    from ..registry import registries as all_registries
    return all_registries()


def lookup(category: str, kind: str, registries=None) -> Any:
    """The class registered as ``kind`` in ``category``; unknown names are a DataError."""
    from ..registry import RegistryError
    try:
        return resolve_registries(registries)[category].get(kind)
    except RegistryError as e:
        raise DataError(str(e)) from None


def check_fraction(where: str, value: float) -> None:
    """Validation fractions must leave data on both sides of the split."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 0.5:
        raise DataError(f"{where}: {value!r} must be a number in (0, 0.5]")


def _kind_spec(category: str, raw: Any, where: str, registries) -> Any:
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise DataError(f"{where}: expected a mapping with a 'kind' key, got {raw!r}")
    cls = lookup(category, raw["kind"], registries)
    try:
        return cls.Spec(**dict(raw))
    except TypeError as e:
        raise DataError(f"{where}: {e}") from None


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from, how it is tokenized, and how batches are drawn."""

    source: Any
    tokenizer: Any
    sampling: str = "random"

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise DataError(f"data.sampling: '{self.sampling}' is not one of {', '.join(SAMPLING_MODES)}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], registries=None) -> "DataSpec":
        if not isinstance(raw, Mapping):
            raise DataError(f"data: expected a mapping with 'source' and 'tokenizer', got {raw!r}")
        unknown = sorted(set(raw) - set(_SECTION_KEYS))
        if unknown:
            raise DataError(f"data: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_SECTION_KEYS)}")
        for key in ("source", "tokenizer"):
            if key not in raw:
                raise DataError(f"data.{key}: missing; add a '{key}:' block with a 'kind'")
        return cls(source=_kind_spec("data_source", raw["source"], "data.source", registries),
                   tokenizer=_kind_spec("tokenizer", raw["tokenizer"], "data.tokenizer", registries),
                   sampling=raw.get("sampling", "random"))

    def to_dict(self) -> dict[str, Any]:
        return {"source": dataclasses.asdict(self.source),
                "tokenizer": dataclasses.asdict(self.tokenizer),
                "sampling": self.sampling}
