"""The ``builtin`` source: corpora shipped inside the package, checked by SHA-256, tokenized like the same file."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from nanodecoder.data import DataError, prepare_data
from nanodecoder.data import builtin
from nanodecoder.data.builtin import SHIPPED, builtin_file, shipped_bytes
from nanodecoder.resources import blueprints_dir, corpora_dir


def test_every_shipped_file_matches_its_record():
    for name, entry in SHIPPED.items():
        data = (corpora_dir() / entry.file).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), name
    assert SHIPPED["tinyshakespeare"].size == 1_115_394
    assert len(json.loads(shipped_bytes("instruction_data", "instructions", "k")[1])) == 1100


def test_builtin_tinyshakespeare_gives_the_tokens_of_the_same_bytes_as_a_text_file(cache, make_spec, tmp_path):
    shutil.copyfile(corpora_dir() / "tinyshakespeare.txt", tmp_path / "input.txt")
    shipped = prepare_data(make_spec({"kind": "builtin", "name": "tinyshakespeare"}, {"kind": "char"}),
                           base_dir=tmp_path / "elsewhere", progress=False)
    as_file = prepare_data(make_spec({"kind": "text", "path": "input.txt", "val_fraction": 0.1}, {"kind": "char"}),
                           base_dir=tmp_path, progress=False)
    assert shipped.tokenizer.vocab_size == as_file.tokenizer.vocab_size == 65
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(shipped.split(split)), np.asarray(as_file.split(split))), split
        assert shipped.manifest["files"][split]["sha256"] == as_file.manifest["files"][split]["sha256"]
    # the last 10%, cut at the nearest line boundary (nanoGPT's exact cut: 1,003,854 / 111,540)
    assert (len(shipped.train), len(shipped.val)) == (1_003_856, 111_538)
    # the cache key: its own folder (kind and name are part of it), another for another val_fraction
    assert shipped.cache_dir != as_file.cache_dir and shipped.cache_dir.name.startswith("builtin-char-")
    other = prepare_data(make_spec({"kind": "builtin", "name": "tinyshakespeare", "val_fraction": 0.2},
                                   {"kind": "char"}), base_dir=tmp_path, progress=False)
    assert other.cache_dir != shipped.cache_dir and len(other.val) > len(shipped.val)


def _damaged(tmp_path, monkeypatch, data: bytes | None):
    folder = tmp_path / "corpora"
    folder.mkdir()
    if data is not None:
        (folder / "tinyshakespeare.txt").write_bytes(data)
    monkeypatch.setattr(builtin, "corpora_dir", lambda: folder)


@pytest.mark.parametrize("change, message", [
    (lambda b: b.replace(b"\n", b"\r\n"), "the shipped file .*tinyshakespeare.txt is not the one nanodecoder "
                                            "ships .1,155,394 bytes, .*reinstall nanodecoder$"),
    (lambda b: b[:-1] + b"?", ".* .1,115,394 bytes, SHA-256 [0-9a-f]{16}..., expected 1,115,394 bytes, "
                              "86c4e6aa9db7c042"),
    (lambda b: None, "cannot read the shipped file tinyshakespeare.txt .*reinstall nanodecoder"),
], ids=["crlf-line-endings", "one-byte-changed", "missing"])
def test_a_damaged_or_missing_shipped_file_is_refused(tmp_path, monkeypatch, make_spec, change, message):
    _damaged(tmp_path, monkeypatch, change((corpora_dir() / "tinyshakespeare.txt").read_bytes()))
    source = make_spec({"kind": "builtin", "name": "tinyshakespeare"}).source.build(base_dir=tmp_path,
                                                                                   cache_root=tmp_path)
    for step in (source.check, source.load):
        with pytest.raises(DataError, match="^data.source.name: " + message) as e:
            step()
        assert "\n" not in str(e.value)


def test_names_are_a_closed_list_per_use():
    with pytest.raises(DataError, match=r"data.source.name: unknown built-in 'shakespeare' "
                                        r"\(available: tinyshakespeare\)$"):
        shipped_bytes("shakespeare", "text", "data.source.name")
    with pytest.raises(DataError, match=r"finetune.data: unknown built-in 'tinyshakespeare' "
                                        r"\(available: instruction_data\)$"):
        builtin_file("builtin:tinyshakespeare", "instructions", "finetune.data")
    with pytest.raises(DataError, match=r"^finetune.data: no shipped file fits here \(built-in 'instruction_data'\); "
                                        "give a file path$"):
        builtin_file("builtin:instruction_data", None, "finetune.data")
    assert builtin_file("builtin:instruction_data", "instructions", "k") == corpora_dir() / "instruction_data.json"


def test_an_unknown_name_in_a_blueprint_is_a_validation_error(tmp_path, capsys):
    from nanodecoder.cli.run import main
    bp = tmp_path / "bp.yaml"
    bp.write_text(f"extends: {blueprints_dir() / 'nanogpt_cpu_char.yaml'}\n"
                  "data:\n  source: {kind: builtin, name: tinyshakespear}\n")
    assert main([str(bp), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.source.name (line 3): unknown value 'tinyshakespear'; did you mean 'tinyshakespeare'? " \
           "(expected one of: tinyshakespeare)" in err and "Traceback" not in err
