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


def test_every_shipped_blueprint_folder_is_installed():
    """pip install . copies each blueprints/ folder that holds YAML (profiles/, zoo/, ...) into the package."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in sorted({p.parent for p in (ROOT / "blueprints").rglob("*.yaml")}):
        rel = folder.relative_to(ROOT).as_posix()
        package = "nanodecoder._shipped." + rel.replace("/", ".")
        assert cfg["package-dir"].get(package) == rel, package
        assert package in cfg["packages"] and "*.yaml" in cfg["package-data"][package], package
