"""pyproject.toml lists every subpackage, and an installed copy finds the shipped schemas and blueprints."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nanodecoder").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_shipped_folders_are_mapped_into_the_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["nanodecoder._shipped.schemas"] == "schemas"
    assert cfg["package-dir"]["nanodecoder._shipped.blueprints"] == "blueprints"
    assert "*.json" in cfg["package-data"]["nanodecoder._shipped.schemas"]
