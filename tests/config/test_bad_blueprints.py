"""Every broken blueprint in ``bad_blueprints/`` produces exactly the message beside it.

A case is ``NAME.yaml`` + ``NAME.expected`` (the full rendered BlueprintError,
loaded with the current directory set to ``bad_blueprints/`` so files show as
``NAME.yaml``) + optionally ``NAME.args`` (one ``--set`` override per line).
Files under ``bad_blueprints/parts/`` are bases that cases ``extends``.

After a deliberate message change, rewrite the expectations with
``NANODECODER_UPDATE_EXPECTED=1 python -m pytest tests/config`` and review the diff.

Lists of registered kinds are written as ``{kinds:norm}`` (``, ``-separated) or
``{kinds|mlp}`` (``|``-separated) in the ``.expected`` files and expanded from
the catalog, so registering a new kind changes no expected text.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.cli.catalog import catalog
from nanodecoder.config import BlueprintError

HERE = Path(__file__).resolve().parent / "bad_blueprints"
ROOT = Path(__file__).resolve().parents[2]
CASES = sorted(p.stem for p in HERE.glob("*.yaml"))
UPDATE = os.environ.get("NANODECODER_UPDATE_EXPECTED") == "1"
LINE = re.compile(r"^  (\S+|--set): (\S+|\(top level\))( \(line \d+\))?: \S.*$")


def _kind_lists() -> list[tuple[str, str]]:
    """``(placeholder, the kinds as the messages list them)`` for every category that has kinds."""
    out = []
    for category, reg in catalog().items():
        if reg.names():
            out += [(f"one of: {{kinds:{category}}}", "one of: " + ", ".join(reg.names())),
                    (f"{{kind: {{kinds|{category}}}, ...}}", "{kind: " + "|".join(reg.names()) + ", ...}")]
    return out


def expand(text: str) -> str:
    for placeholder, kinds in _kind_lists():
        text = text.replace(placeholder, kinds)
    return text


def with_placeholders(text: str) -> str:
    for placeholder, kinds in _kind_lists():
        text = text.replace(kinds + ")", placeholder + ")").replace(kinds + "\n", placeholder + "\n")
        if kinds.startswith("{kind:"):
            text = text.replace(kinds, placeholder)
    return text


def overrides(name: str) -> list[str]:
    args = HERE / f"{name}.args"
    return [a for a in args.read_text().splitlines() if a.strip()] if args.exists() else []


def rendered(name: str) -> str:
    with pytest.raises(BlueprintError) as info:
        load_blueprint(f"{name}.yaml", overrides(name))
    return info.value.render() + "\n"


def test_the_corpus_is_complete():
    assert len(CASES) >= 25
    stems = {p.stem for p in HERE.iterdir() if p.is_file()}
    assert stems == set(CASES), "every .expected/.args file needs its .yaml (and the other way round)"
    missing = [n for n in CASES if not (HERE / f"{n}.expected").is_file()]
    assert not missing, f"cases without an .expected file: {missing}"


@pytest.mark.parametrize("name", CASES)
def test_bad_blueprint_message(name, monkeypatch):
    monkeypatch.chdir(HERE)
    got = rendered(name)
    expected = HERE / f"{name}.expected"
    if UPDATE:
        expected.write_text(with_placeholders(got))
    assert got == expand(expected.read_text())


@pytest.mark.parametrize("name", CASES)
def test_every_message_line_has_the_format(name):
    head, *lines = (HERE / f"{name}.expected").read_text().splitlines()
    assert re.fullmatch(r"invalid blueprint \((1 problem|\d+ problems)\):", head)
    assert lines and int(head.split("(")[1].split()[0]) == len(lines)
    for line in lines:
        assert LINE.match(line), line
        assert "Traceback" not in line and "{'" not in line and "ValidationError" not in line


def test_problems_in_one_file_are_sorted_by_line():
    for name in CASES:
        located = [(f, int(n)) for f, n in re.findall(r"^  (\S+): \S+ \(line (\d+)\)",
                                                      (HERE / f"{name}.expected").read_text(), re.M)]
        for (f1, n1), (f2, n2) in zip(located, located[1:]):
            assert f1 != f2 or n1 <= n2, name


def test_cli_exits_2_with_the_message_and_no_traceback():
    name = "several_problems_sorted_by_line"
    args = [a for o in overrides(name) for a in ("--set", o)]
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "param_count.py"), f"{name}.yaml", *args],
                         cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    assert out.stderr == "error: " + expand((HERE / f"{name}.expected").read_text())
