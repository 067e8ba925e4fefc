"""Where the shipped schemas and blueprints live, from a checkout or an install.

In a source checkout they are the top-level ``schemas/`` and ``blueprints/``
folders; ``pip install .`` copies the same folders into the package as
``nanodecoder/_shipped/{schemas,blueprints}`` (see ``pyproject.toml``).  The shipped
corpora live inside the package in both cases (``nanodecoder/data/corpora``).
"""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str, candidates: tuple[Path, ...] = ()) -> Path:
    for candidate in candidates or (_PKG.parent / name, _PKG / "_shipped" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the shipped '{name}' folder next to {_PKG}; reinstall nanodecoder")


def schemas_dir() -> Path:
    return _find("schemas")


def blueprints_dir() -> Path:
    return _find("blueprints")


def corpora_dir() -> Path:
    """The data files shipped inside the package: ``nanodecoder/data/corpora`` in a checkout and an install alike
    (listed in ``pyproject.toml``'s package-data; ``nanodecoder/data/builtin.py`` names them)."""
    return _find("corpora", (_PKG / "data" / "corpora",))


def resolve_blueprint(path: str | Path) -> Path:
    """A path as given, or a shipped blueprint by name: ``moe_gpt``, ``moe_gpt.yaml``, ``zoo/gemma2_2b`` or
    ``blueprints/zoo/gemma2_2b.yaml`` (what works in a checkout works from an installed copy too)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("blueprints",) else p.parts
    if not parts:
        return p
    shipped = blueprints_dir().joinpath(*parts)
    for cand in (shipped, shipped.with_suffix(".yaml")):
        if cand.is_file():
            return cand
    return p
