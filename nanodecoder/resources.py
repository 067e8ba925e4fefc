"""Where the shipped schemas and blueprints live, from a checkout or an install.

In a source checkout they are the top-level ``schemas/`` and ``blueprints/``
folders; ``pip install .`` copies the same folders into the package as
``nanodecoder/_shipped/{schemas,blueprints}`` (see ``pyproject.toml``).
"""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG.parent / name, _PKG / "_shipped" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the shipped '{name}' folder next to {_PKG}; reinstall nanodecoder")


def schemas_dir() -> Path:
    return _find("schemas")


def blueprints_dir() -> Path:
    return _find("blueprints")


def resolve_blueprint(path: str | Path) -> Path:
    """A path as given, or the name of a shipped blueprint (``moe_gpt`` or ``moe_gpt.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = blueprints_dir() / p.name
    for cand in (shipped, shipped.with_suffix(".yaml")):
        if p.parent == Path(".") or str(p.parent) == "blueprints":
            if cand.is_file():
                return cand
    return p
