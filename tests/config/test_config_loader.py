"""Good paths of blueprint loading: line map, ``extends`` merging, ``--set`` typing, round trips."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.config import BlueprintError
from nanodecoder.config.loader import dotted, parse_yaml

BASE = """\
# a small dense model
description: base blueprint
model:
  vocab_size: 256
  context_length: 64
  d_model: 64
  n_layers: 4
  block:
    norm: {kind: layernorm, bias: true}
    attention: {kind: causal, n_heads: 4}
    mlp:
      kind: gelu
      hidden_mult: 4.0
  overrides:
    - layers: [0]
      mlp: {kind: swiglu}
train:
  lr: 1.0e-3
  optimizer: {kind: adamw, betas: [0.9, 0.95], weight_decay: 0.1}
"""

CHILD = """\
extends: base.yaml
name: child
model:
  n_layers: 2
  block:
    norm: {kind: rmsnorm}
    attention: {n_kv_heads: 2}
  overrides:
    - layers: [1]
      mlp: {kind: relu2}
train:
  optimizer: {betas: [0.8, 0.9]}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "child.yaml", CHILD)
    return tmp_path


def test_line_map_points_at_every_key_and_list_item(here):
    bp = load_blueprint("base.yaml")
    lines = bp.lines
    assert lines[("description",)] == ("base.yaml", 2)
    assert lines[("model",)] == ("base.yaml", 3)
    assert lines[("model", "d_model")] == ("base.yaml", 6)
    assert lines[("model", "block", "attention", "n_heads")] == ("base.yaml", 10)
    assert lines[("model", "block", "mlp", "hidden_mult")] == ("base.yaml", 13)
    assert lines[("model", "overrides", 0)] == ("base.yaml", 15)
    assert lines[("model", "overrides", 0, "mlp", "kind")] == ("base.yaml", 16)
    assert lines[("train", "optimizer", "betas", 1)] == ("base.yaml", 19)
    text = Path("base.yaml").read_text().splitlines()
    for path, (_, line) in lines.items():       # every key path sits on a line that names its last key
        if path and isinstance(path[-1], str):
            assert path[-1] in text[line - 1], dotted(path)


def test_extends_deep_merges_mappings_and_replaces_lists_and_scalars(here):
    raw = load_blueprint("child.yaml").raw
    assert "extends" not in raw
    assert raw["name"] == "child" and raw["description"] == "base blueprint"
    model = raw["model"]
    assert model["n_layers"] == 2 and model["d_model"] == 64
    assert model["block"]["attention"] == {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}   # mappings merge
    assert model["block"]["mlp"] == {"kind": "gelu", "hidden_mult": 4.0}
    assert model["block"]["norm"] == {"kind": "rmsnorm"}        # another kind: base's parameters are not inherited
    assert model["overrides"] == [{"layers": [1], "mlp": {"kind": "relu2"}}]  # lists replace
    assert raw["train"]["optimizer"] == {"kind": "adamw", "betas": [0.8, 0.9], "weight_decay": 0.1}
    assert raw["train"]["lr"] == 1.0e-3
    assert list(raw) == ["description", "model", "train", "name"]             # base order, then new keys


def test_inherited_keys_point_at_the_base_file(here):
    lines = load_blueprint("child.yaml").lines
    assert lines[("model", "d_model")] == ("base.yaml", 6)
    assert lines[("model", "block", "attention", "n_heads")] == ("base.yaml", 10)
    assert lines[("train", "optimizer", "weight_decay")] == ("base.yaml", 19)
    assert lines[("model", "n_layers")] == ("child.yaml", 4)
    assert lines[("model", "block", "norm", "kind")] == ("child.yaml", 6)
    assert lines[("model", "block", "attention", "n_kv_heads")] == ("child.yaml", 7)
    assert lines[("model", "block", "attention", "kind")] == ("base.yaml", 10)
    assert ("model", "block", "norm", "bias") not in lines
    assert lines[("model", "overrides", 0, "mlp")] == ("child.yaml", 10)
    assert lines[("train", "optimizer", "betas", 0)] == ("child.yaml", 12)
    assert ("model", "overrides", 0, "mlp", "hidden_mult") not in lines
    assert lines[("model",)] == ("child.yaml", 3)


def test_extends_chains_relative_to_each_file(here):
    write(here, "variants/deep/grandchild.yaml", "extends: ../../child.yaml\nmodel: {d_model: 128}\n")
    bp = load_blueprint("variants/deep/grandchild.yaml")
    assert (bp.raw["model"]["d_model"], bp.raw["model"]["n_layers"], bp.raw["model"]["vocab_size"]) == (128, 2, 256)
    assert bp.lines[("model", "d_model")] == ("variants/deep/grandchild.yaml", 2)
    assert bp.lines[("model", "vocab_size")] == ("base.yaml", 4)
    assert bp.name == "child"


def test_misspelled_key_inherited_through_extends_reports_the_base_file(here):
    write(here, "base.yaml", BASE.replace("  d_model: 64", "  d_model: 64\n  dropuot: 0.1"))
    with pytest.raises(BlueprintError) as e:
        load_blueprint("child.yaml")
    (p,) = e.value.problems
    assert (p.file, p.path, p.line) == ("base.yaml", "model.dropuot", 7)
    assert "did you mean 'dropout'?" in p.message


def test_set_overrides_are_typed_yaml_values(here):
    bp = load_blueprint("base.yaml", ["train.lr=3.0e-4", "model.positional={kind: rope, theta: 500000}",
                                      "model.n_layers=2", "sample.prompt='yes'", "train.grad_clip=",
                                      "model.block.attention.n_kv_heads=2"])
    raw = bp.raw
    assert raw["train"]["lr"] == 3.0e-4 and isinstance(raw["train"]["lr"], float)
    assert raw["model"]["positional"] == {"kind": "rope", "theta": 500000}
    assert raw["model"]["n_layers"] == 2 and isinstance(raw["model"]["n_layers"], int)
    assert raw["sample"] == {"prompt": "yes"}                                    # a new section
    assert raw["train"]["grad_clip"] is None                                     # empty value: null
    assert raw["model"]["block"]["attention"] == {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}
    assert bp.lines[("train", "lr")] == ("--set", None)
    assert bp.lines[("model", "positional")] == ("--set", None)
    assert bp.lines[("sample",)] == ("--set", None)
    assert bp.lines[("model", "block", "attention", "kind")] == ("base.yaml", 10)


def test_set_replaces_a_whole_block_and_forgets_its_old_lines(here):
    bp = load_blueprint("base.yaml", ["model.block.mlp={kind: swiglu}"])
    assert bp.raw["model"]["block"]["mlp"] == {"kind": "swiglu"}
    assert ("model", "block", "mlp", "hidden_mult") not in bp.lines
    assert bp.lines[("model", "block", "mlp")] == ("--set", None)


def test_set_indexes_lists_and_applies_in_order(here):
    bp = load_blueprint("base.yaml", ["model.overrides.0.mlp.kind=relu2", "train.lr=1.0e-2", "train.lr=2.0e-2"])
    assert bp.raw["model"]["overrides"][0] == {"layers": [0], "mlp": {"kind": "relu2"}}
    assert bp.raw["train"]["lr"] == 2.0e-2


def test_set_is_validated_like_the_file(here):
    with pytest.raises(BlueprintError) as e:
        load_blueprint("base.yaml", ["model.block.attention.n_heads=5"])
    (p,) = e.value.problems
    assert (p.file, p.path, p.line) == ("--set", "model.block.attention.n_heads", None)
    assert str(p).startswith("--set: model.block.attention.n_heads: d_model (64) must be divisible")


@pytest.mark.parametrize("name,overrides", [("base.yaml", []), ("child.yaml", ["model.positional={kind: rope}"])])
def test_to_yaml_round_trips_to_the_same_raw(here, name, overrides):
    bp = load_blueprint(name, overrides)
    write(here, "saved.yaml", bp.to_yaml())
    again = load_blueprint("saved.yaml")
    assert again.raw == bp.raw
    assert yaml.safe_dump(again.raw) == yaml.safe_dump(bp.raw)          # same types, not just equal values
    assert again.to_yaml() == bp.to_yaml()


def test_shipped_blueprint_loads_by_path_and_by_name():
    by_path = load_blueprint(Path(__file__).resolve().parents[2] / "blueprints" / "gpt2_124m.yaml")
    by_name = load_blueprint("gpt2_124m")
    assert by_path.raw == by_name.raw and by_name.name == "gpt2_124m"
    assert by_name.lines[("model", "d_model")][1] == 10


def test_merge_keys_work_and_explicit_keys_win():
    data, lines = parse_yaml("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n", "f.yaml")
    assert data["b"] == {"p": 1, "q": 3}
    assert lines[("b", "q")] == ("f.yaml", 4)


@pytest.mark.parametrize("text,message", [
    ("a: 1\nb:\n  c: 1\n  c: 2\n", "b.c (line 4): duplicate key 'c' (first on line 3)"),
    ("model: &a [*a]\n", "a YAML alias that contains itself"),
    ("model: !!python/object/apply:os.system [echo]\n", "is not allowed"),
    ("? [a]\n: 1\n", "a key must be a plain name"),
])
def test_yaml_traps_are_problems_not_crashes(text, message):
    with pytest.raises(BlueprintError) as e:
        parse_yaml(text, "f.yaml")
    assert message in str(e.value)


def test_missing_file_and_non_utf8_are_problems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00model")
    for name, message in (("nope.yaml", "file not found"), ("bin.yaml", "not UTF-8")):
        with pytest.raises(BlueprintError) as e:
            load_blueprint(name)
        assert message in str(e.value) and f"{name}: (top level)" in str(e.value)


def test_null_over_an_inherited_section_removes_it(here):
    """``data: null`` in a blueprint that extends one with a data section: the child has no data (it used to be
    "expected a mapping, got null"); the rest is inherited as usual."""
    write(here, "with_data.yaml", BASE + "data:\n  source: {kind: text, path: corpus.txt}\n"
                                         "  tokenizer: {kind: byte}\n")
    write(here, "no_data.yaml", "extends: with_data.yaml\nname: no_data\ndata: null\n")
    bp = load_blueprint("no_data.yaml")
    assert "data" not in bp.raw and not any(p[:1] == ("data",) for p in bp.lines)
    assert bp.raw["model"]["d_model"] == 64
    assert load_blueprint("with_data.yaml").raw["data"]["tokenizer"] == {"kind": "byte"}
