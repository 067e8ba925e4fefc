"""Every registered kind of every category (the library's, ``nanodecoder/api/catalog.py``; kept here for the
command-line modules and existing imports)."""
from __future__ import annotations

from ..api.catalog import REGISTERS, builtin_catalog, catalog

__all__ = ["REGISTERS", "builtin_catalog", "catalog"]
