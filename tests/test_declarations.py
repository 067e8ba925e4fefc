"""One declaration per parameter: the committed schemas are generated, and no default is stated twice."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from nanodecoder.cli import schemas as schema_files
from nanodecoder.cli.blueprint import RunSpec
from nanodecoder.cli.catalog import builtin_catalog
from nanodecoder.components.norms import RMSNorm
from nanodecoder.config.declare import default_of, hints, is_declared, params, strip_none
from nanodecoder.resources import blueprints_dir, schemas_dir
from nanodecoder.runtime.profiles import Profile

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nanodecoder"

#: ``.get(key, default)`` calls whose receiver is not a blueprint mapping (file, receiver): why
NOT_BLUEPRINT = {("config/messages.py", "schema"): "a JSON Schema node's description",
                 ("cli/run.py", "meta"): "the run folder's run.json",
                 ("hf/families.py", "config"): "a Hugging Face config.json, whose defaults are transformers'",
                 ("hf/families.py", "params"): "the rope parameters of a Hugging Face config.json",
                 ("data/chat.py", "kwargs"): "the keyword arguments of a Jinja filter call in a chat template"}


def declared_classes() -> set[type]:
    """Every declared class reachable from the blueprint, the profile and the registered kinds."""
    seen: set[type] = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        th = hints(cls)
        for f, _ in params(cls):
            tp, _ = strip_none(th[f.name])
            for t in (tp, *typing.get_args(tp), *[a for b in typing.get_args(tp) for a in typing.get_args(b)]):
                if is_declared(t):
                    walk(t)

    walk(RunSpec)
    walk(Profile)
    for reg in builtin_catalog().values():
        for kind in reg.names():
            walk(reg.get(kind).Spec)
    return seen


def yaml_keys() -> set[str]:
    return {m.key or f.name for cls in declared_classes() for f, m in params(cls)}


def test_the_committed_schemas_are_what_the_declarations_generate():
    """So no schema file holds a hand-written default (or anything else hand-written)."""
    assert schema_files.stale(schemas_dir()) == [], "run python tools/write_schemas.py"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "write_schemas.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_editing_a_default_without_regenerating_is_caught(monkeypatch, tmp_path):
    field = RMSNorm.Spec.__dataclass_fields__["eps"]
    monkeypatch.setattr(field, "default", 1e-7)
    assert schema_files.stale(schemas_dir()) == ["blueprint.schema.json"]
    out = schema_files.main(["--check"])
    assert out == 1
    for name, text in schema_files.generated().items():       # and regenerating makes it agree again
        (tmp_path / name).write_text(text)
    assert schema_files.stale(tmp_path) == []
    assert json.loads((tmp_path / "blueprint.schema.json").read_text())["$defs"]["norm.rmsnorm"]["properties"][
        "eps"]["default"] == 1e-7


def test_no_raw_blueprint_lookup_restates_a_default():
    """A ``mapping.get("declared_key", <literal>)`` in the package would be a second copy of a default."""
    keys = yaml_keys()
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "setdefault", "pop") and len(node.args) == 2):
                continue
            key, default = node.args
            receiver = ast.unparse(node.func.value)
            if isinstance(key, ast.Constant) and key.value in keys \
                    and not (isinstance(default, ast.Constant) and default.value is None) \
                    and (rel, receiver) not in NOT_BLUEPRINT:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert len(keys) > 100
    assert not found, "read the built spec instead of the raw mapping:\n" + "\n".join(found)


def test_no_profile_file_restates_a_declared_default():
    defaults = {f.name: default_of(f) for f, _ in params(Profile)}
    restated = []
    for path in sorted((blueprints_dir() / "profiles").glob("*.yaml")):
        for key, value in yaml.safe_load(path.read_text()).items():
            if key in defaults and value == defaults[key]:
                restated.append(f"{path.name}: {key}: {value!r}")
    assert not restated, "leave these out (the declaration in runtime/profiles.py is the default):\n" + \
        "\n".join(restated)


def test_profile_defaults_come_from_the_declaration(tmp_path):
    from nanodecoder.runtime import load_profile
    (tmp_path / "p.yaml").write_text("description: only a description\n")
    assert dataclasses.replace(load_profile("p", tmp_path / "p.yaml"), name="") == Profile(description="only a "
                                                                                                  "description")


def test_an_absent_section_is_built_with_its_default_kinds():
    from nanodecoder.cli.blueprint import run_spec
    spec = run_spec({"model": {"vocab_size": 10, "context_length": 8, "d_model": 8, "n_layers": 1,
                               "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}}})
    assert spec.train.optimizer.kind == "adamw" and spec.train.schedule.kind == "cosine"
    assert spec.train.optimizer.impl is not None and spec.logging.wandb.mode == "disabled"


def test_the_readme_component_table_is_the_catalogs():
    """The README's table is generated (python tools/write_schemas.py); a kind added or re-documented shows."""
    from nanodecoder.config.catalog_docs import BEGIN, CatalogDocError, table, with_table
    assert not schema_files.readme_stale(), "run python tools/write_schemas.py"
    catalog = schema_files.builtin_catalog()
    text = schema_files.README.read_text(encoding="utf-8")
    assert table(catalog) in text and text.count(BEGIN) == 1
    assert all(f"| `{name}` |" in text for category in catalog.values() for name in category)

    class Undocumented:
        Spec = RMSNorm.Spec
    catalog["norm"].add("undocumented", Undocumented)
    with pytest.raises(CatalogDocError, match="has no docstring"):
        table(catalog)
    Undocumented.__doc__ = "A norm for this test. More text that stays out of the table."
    assert "| norm | `undocumented` | A norm for this test. | `eps` |" in with_table(text, catalog)
