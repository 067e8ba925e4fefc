"""prepare_data: token files + manifest in a hashed cache folder, built atomically, checked on load."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import nanodecoder.data.prepare as prepare_mod
from nanodecoder.config.declare import Kind, declared
from nanodecoder.data.download import sha256_of
from nanodecoder.data import (ByteTokenizer, DataError, bits_per_byte, cache_root, check_fits, load_prepared,
                              prepare_data)

SHAKES = "".join(f"First Citizen:\nBefore we proceed any further, hear me speak {i}.\n\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "bp").mkdir()
    (tmp_path / "bp" / "input.txt").write_text(SHAKES)
    return tmp_path / "bp"


def text_spec(make_spec, tokenizer=None, path="input.txt"):
    return make_spec({"kind": "text", "path": path}, tokenizer)


def test_prepared_tokens_manifest_and_bytes_match_the_text(cache, corpus, make_spec, regs):
    prep = prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    m = prep.manifest
    assert prep.cache_dir.parent == cache / "prepared" and prep.cache_dir.name.startswith("text-byte-")
    assert isinstance(prep.train, np.memmap) and prep.train.dtype == np.uint16 and m["dtype"] == "uint16"
    train, val = (prep.tokenizer.decode(a.tolist()) for a in (prep.train, prep.val))
    assert train + val == SHAKES and train.endswith("\n")               # the last 10%, cut at a line
    assert m["n_tokens"] == {"train": len(prep.train), "val": len(prep.val)}
    assert m["n_bytes"] == {"train": len(train.encode()), "val": len(val.encode())}
    assert abs(m["n_bytes"]["val"] / len(SHAKES) - 0.1) < 0.01
    assert m["n_docs"] == {"train": 1, "val": 1} and m["tokenizer"]["kind"] == "byte"
    for split in ("train", "val"):
        f = prep.cache_dir / m["files"][split]["name"]
        assert m["files"][split]["size"] == f.stat().st_size
        assert m["files"][split]["sha256"] == sha256_of(f)
    assert load_prepared(prep.cache_dir, catalog=regs, verify_checksums=True).manifest == m
    assert sorted(p.name for p in prep.cache_dir.iterdir()) == ["manifest.json", "tokenizer", "train.bin", "val.bin"]


def test_documents_are_joined_by_eot_or_by_separator_text(cache, corpus, make_spec, regs):
    (corpus / "docs").mkdir()
    for i in range(4):
        (corpus / "docs" / f"{i}.txt").write_text(f"document {i}\n" * 30)
    bpe = prepare_data(text_spec(make_spec, {"kind": "bpe", "vocab_size": 300}, "docs"), base_dir=corpus,
                       progress=False)
    eot = bpe.tokenizer.eot_id
    assert bpe.manifest["separator"] == "eot" and int((bpe.train == eot).sum()) == 3
    assert bpe.manifest["n_bytes"]["train"] + bpe.manifest["n_bytes"]["val"] == 4 * 30 * 11
    byte = prepare_data(text_spec(make_spec, {"kind": "byte"}, "docs"), base_dir=corpus, progress=False)
    assert byte.manifest["separator"] == "\n\n"
    assert byte.tokenizer.decode(byte.train.tolist()).count("\n\ndocument") == 3


def test_second_prepare_is_a_cache_hit_and_settings_change_the_folder(cache, corpus, make_spec, regs,
                                                                      monkeypatch):
    spec = text_spec(make_spec)
    first = prepare_data(spec, base_dir=corpus, progress=False)
    monkeypatch.setattr(prepare_mod, "build_prepared", lambda *a, **k: pytest.fail("must not rebuild"))
    assert prepare_data(spec, base_dir=corpus, progress=False).cache_dir == first.cache_dir
    monkeypatch.undo()
    monkeypatch.setenv("NANODECODER_CACHE", str(cache))
    other_tok = prepare_data(text_spec(make_spec, {"kind": "char"}), base_dir=corpus, progress=False)
    (corpus / "input.txt").write_text(SHAKES + "More text.\n")
    other_text = prepare_data(spec, base_dir=corpus, progress=False)
    assert len({first.cache_dir, other_tok.cache_dir, other_text.cache_dir}) == 3


def test_cache_root_comes_from_argument_env_or_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("NANODECODER_CACHE")
    assert cache_root().name == "nanodecoder"


def test_damaged_cache_is_a_clear_error_naming_the_folder(cache, corpus, make_spec, regs):
    prep = prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    folder = prep.cache_dir
    del prep
    with open(folder / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=f"{folder} is damaged: val.bin is 10 bytes, expected .*; delete") as e:
        prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    assert "\n" not in str(e.value)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="unreadable manifest.json"):
        load_prepared(folder, catalog=regs)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match=f"{folder} is incomplete \\(no manifest.json\\); delete {folder}"):
        load_prepared(folder, catalog=regs)


def test_checksums_are_verified_on_request(cache, corpus, make_spec, regs):
    folder = prepare_data(text_spec(make_spec), base_dir=corpus, progress=False).cache_dir
    data = bytearray((folder / "train.bin").read_bytes())
    data[0] ^= 1
    (folder / "train.bin").write_bytes(bytes(data))
    load_prepared(folder, catalog=regs)                       # sizes still agree
    with pytest.raises(DataError, match="train.bin fails its SHA-256"):
        load_prepared(folder, catalog=regs, verify_checksums=True)


def test_interrupted_preparation_leaves_nothing_behind(cache, corpus, make_spec, regs, monkeypatch):
    real = prepare_mod.write_split

    def interrupted(path, docs, tokenizer, dtype, name, progress):
        if name == "val":
            raise KeyboardInterrupt
        return real(path, docs, tokenizer, dtype, name, progress)

    monkeypatch.setattr(prepare_mod, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    assert list((cache / "prepared").iterdir()) == []


def test_losing_the_race_uses_the_winners_folder(cache, corpus, make_spec, regs, monkeypatch):
    real = prepare_mod.build_prepared
    spec = text_spec(make_spec)
    calls = []

    def racing(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 1:      # another process prepares and publishes the same data meanwhile
            prepare_data(spec, base_dir=corpus, progress=False)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "build_prepared", racing)
    prep = prepare_data(spec, base_dir=corpus, progress=False)
    assert len(calls) == 2 and [p.name for p in (cache / "prepared").iterdir()] == [prep.cache_dir.name]
    assert prep.tokenizer.decode(prep.train.tolist()) + prep.tokenizer.decode(prep.val.tolist()) == SHAKES


def test_temporary_folders_of_dead_processes_are_removed(cache, corpus, make_spec, regs):
    parent = cache / "prepared"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    owners = {"dead": {"host": socket.gethostname(), "pid": dead.pid},
              "alive": {"host": socket.gethostname(), "pid": os.getpid()},
              "elsewhere": {"host": socket.gethostname() + "-other", "pid": dead.pid}}
    for name, owner in owners.items():
        (parent / f".tmp-{name}").mkdir(parents=True)
        (parent / f".tmp-{name}" / "owner.json").write_text(json.dumps(owner))
    prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    assert sorted(p.name for p in parent.glob(".tmp-*")) == [".tmp-alive", ".tmp-elsewhere"]


class WideTokenizer(ByteTokenizer):
    """A plug-in style tokenizer whose ids pass 65535 (bytes shifted up)."""

    kind = "wide"
    vocab_size = 70_000

    @declared
    class Spec(Kind):
        pass

    def encode_array(self, text):
        return super().encode_array(text).astype(np.int64) + 65_600

    def decode(self, ids):
        return super().decode([i - 65_600 for i in ids])


def test_large_vocabularies_are_stored_as_uint32(cache, corpus, make_spec, regs):
    regs["tokenizer"].add("wide", WideTokenizer, origin="test")
    prep = prepare_data(text_spec(make_spec, {"kind": "wide"}), base_dir=corpus, progress=False)
    assert prep.train.dtype == np.uint32 and int(prep.train.max()) > 65_535
    assert prep.tokenizer.decode(prep.train.tolist()) + prep.tokenizer.decode(prep.val.tolist()) == SHAKES


def test_progress_bars_go_to_stderr_and_can_be_turned_off(cache, corpus, make_spec, regs, capsys):
    prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    assert capsys.readouterr() == ("", "")
    prepare_data(text_spec(make_spec, {"kind": "char"}), base_dir=corpus, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "tokenize train" in err and "tokenize val" in err


def test_stdlib_source_prepares_a_capped_corpus(cache, make_spec, regs, tmp_path):
    spec = make_spec({"kind": "python_stdlib", "val_fraction": 0.05, "max_bytes": 60_000},
                     {"kind": "bpe", "vocab_size": 512})
    prep = prepare_data(spec, base_dir=tmp_path, progress=False)
    m = prep.manifest
    assert prep.tokenizer.vocab_size == 512 and m["n_bytes"]["train"] + m["n_bytes"]["val"] <= 60_000
    assert m["n_tokens"]["train"] < m["n_bytes"]["train"] / 2 and m["n_tokens"]["val"] > 0
    assert "def " in prep.tokenizer.decode(prep.train[:20_000].tolist())


def test_bits_per_byte_converts_nats_per_token():
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 300, 1200) == pytest.approx(2.0 * 300 / (1200 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 10, 0)


def test_check_fits_guards_context_and_vocabulary(cache, corpus, make_spec, regs):
    prep = prepare_data(text_spec(make_spec), base_dir=corpus, progress=False)
    check_fits(prep, context_length=64, vocab_size=256)
    with pytest.raises(DataError, match="byte tokenizer has 256 tokens but the model's vocab_size is 200; "
                                        "set the model's vocab_size to at least 256"):
        check_fits(prep, context_length=64, vocab_size=200)
    n_val = len(prep.val)
    with pytest.raises(DataError, match=f"the val split has {n_val} tokens, fewer than context_length \\+ 1"):
        check_fits(prep, context_length=n_val, vocab_size=256)
    check_fits(prep, context_length=n_val - 1, vocab_size=256)


def test_an_unwritable_cache_is_a_clear_error(tmp_path, corpus, make_spec, regs):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write to the cache folder .*set NANODECODER_CACHE"):
        prepare_data(text_spec(make_spec), base_dir=corpus, cache_dir=blocker, progress=False)
