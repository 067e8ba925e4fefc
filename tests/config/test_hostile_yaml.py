"""Hostile blueprint text: each class of bad input ends in one clear message (file, line, what, the limit),
never a traceback, a hang or unbounded memory."""
from __future__ import annotations

import pytest

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.config import BlueprintError
from nanodecoder.config.loader import MAX_CHARS, MAX_DEPTH

BASE = """model:
  context_length: 16
  d_model: 16
  n_layers: 1
  vocab_size: 32
  block: {attention: {kind: causal, n_heads: 2}, mlp: {kind: gelu}}
"""


def problems_of(tmp_path, text: str, overrides=()) -> str:
    f = tmp_path / "bp.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(BlueprintError) as e:
        load_blueprint(str(f), list(overrides))
    return str(e.value)


@pytest.mark.parametrize("char,name", [("\x1b", "ESC"), ("\x00", "NUL"), ("\x07", "BEL")])
def test_a_control_character_is_named_with_its_line_and_column(tmp_path, char, name):
    msg = problems_of(tmp_path, BASE + f"description: a{char}b\n")
    assert "(line 7)" in msg and f"({name}) at column 15" in msg


def test_a_control_character_in_a_set_value(tmp_path):
    msg = problems_of(tmp_path, BASE, ["train.lr=1\x07"])
    assert "--set: train.lr" in msg and "U+0007 (BEL)" in msg and "'1\\x07'" in msg


@pytest.mark.parametrize("style", ["flow_map", "flow_list", "block_map", "block_list"])
def test_deep_nesting_is_refused_before_any_recursion(tmp_path, style):
    n = 500
    text = {"flow_map": "x: " + "{a: " * n + "1" + "}" * n,
            "flow_list": "x: " + "[" * n + "]" * n,
            "block_map": "".join("  " * i + "k:\n" for i in range(n)) + "  " * n + "v: 1",
            "block_list": "x:\n" + "".join("  " * i + "-\n" for i in range(1, n)) + "  " * n + "- 1"}[style]
    msg = problems_of(tmp_path, BASE + text + "\n")
    assert f"nested more than {MAX_DEPTH} levels" in msg


def test_a_huge_file_is_refused_by_its_size_before_parsing(tmp_path):
    text = BASE + "".join(f"k{i}: {i}\n" for i in range(MAX_CHARS // 8))
    msg = problems_of(tmp_path, text)
    assert f"more than the {MAX_CHARS:,}" in msg and "alias" not in msg


def test_many_keys_under_the_size_limit_are_refused_without_blaming_aliases(tmp_path):
    text = BASE + "x: [" + ",".join(["1"] * 210_000) + "]\n"
    msg = problems_of(tmp_path, text)
    assert "more than 100,000 keys and values" in msg and "alias" not in msg


@pytest.mark.parametrize("key,value,word", [("train.lr", ".nan", ".nan"), ("model.dropout", ".inf", ".inf"),
                                            ("sample.temperature", "-.inf", "-.inf")])
def test_non_finite_numbers_are_refused_at_validation(tmp_path, key, value, word):
    msg = problems_of(tmp_path, BASE, [f"{key}={value}"])
    assert f"--set: {key}: {word} is not a usable number" in msg


def test_non_finite_numbers_in_the_file_have_their_line(tmp_path):
    msg = problems_of(tmp_path, BASE + "train: {lr: .NaN}\n")
    assert "train.lr (line 7): .nan is not a usable number" in msg


def test_an_integer_beyond_64_bits_is_refused(tmp_path):
    msg = problems_of(tmp_path, BASE, [f"train.seed={2 ** 70}"])
    assert "train.seed" in msg and "out of range" in msg


@pytest.mark.parametrize("name", ["..", "."])
def test_a_run_name_is_a_plain_name(tmp_path, name):
    msg = problems_of(tmp_path, BASE + f"name: '{name}'\n")
    assert "name (line 7)" in msg
