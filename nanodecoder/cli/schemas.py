"""The committed JSON Schemas (``schemas/*.json``, for editors) and the README's component table, generated
from the declarations and the catalog.

    python tools/write_schemas.py           # rewrite schemas/ (and, in a checkout, the README's table)
    python tools/write_schemas.py --check   # exit 1 when either differs from what the code generates

Validation never reads these files: it generates the same schema in memory,
with the plug-ins' kinds added.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.catalog_docs import with_table
from ..config.schema import dumps
from ..config.validate import schema_of
from ..resources import schemas_dir
from ..runtime.profiles import Profile
from .blueprint import RunSpec
from .catalog import builtin_catalog

FILES = {"blueprint.schema.json": RunSpec, "profile.schema.json": Profile}


def generated() -> dict[str, str]:
    """File name -> the text the declarations generate (built-in kinds only)."""
    catalog = builtin_catalog()
    return {name: dumps(schema_of(root, catalog)) for name, root in FILES.items()}


def stale(folder: Path) -> list[str]:
    """The files of ``folder`` that differ from the generated ones (missing, changed or left over)."""
    want = generated()
    have = {p.name for p in folder.glob("*.json")}
    out = [n for n, text in want.items() if not (folder / n).is_file() or (folder / n).read_text() != text]
    return out + sorted(have - set(want))


#: the checkout's README (absent in an installed copy, where only the schemas are checked)
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_stale(readme: Path = README) -> bool:
    """Whether the README's component table differs from the catalog's (False where there is no README)."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    return with_table(text, builtin_catalog(), readme.name) != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/write_schemas.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when schemas/ are out of date")
    p.add_argument("--dir", type=Path, default=None, help="the schemas folder (default: the shipped one)")
    args = p.parse_args(argv)
    folder = args.dir or schemas_dir()
    if args.check:
        bad = stale(folder) + ([str(README)] if readme_stale() else [])
        if bad:
            print(f"out of date in {folder}: {', '.join(bad)}; run python tools/write_schemas.py", file=sys.stderr)
            return 1
        print(f"{folder}: up to date")
        return 0
    want = generated()
    for name, text in want.items():
        (folder / name).write_text(text)
    for extra in sorted({q.name for q in folder.glob("*.json")} - set(want)):
        (folder / extra).unlink()
    print(f"wrote {', '.join(want)} to {folder}")
    if readme_stale():
        README.write_text(with_table(README.read_text(encoding="utf-8"), builtin_catalog(), README.name),
                          encoding="utf-8")
        print(f"wrote the component table of {README}")
    return 0
