"""The url source and its download: checked, cached, never half-written (a local server on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import socket

import pytest

from nanodecoder.data import DataError, prepare_data
from nanodecoder.data.download import fetch

BODY = "".join(f"To be, or not to be, line {i}.\n" for i in range(200)).encode()
SHA = hashlib.sha256(BODY).hexdigest()


def test_fetch_downloads_verifies_and_then_uses_the_cache(tmp_path, http_server):
    http_server.files["/corpus.txt"] = BODY
    url = http_server.url + "/corpus.txt"
    path = fetch(url, SHA, tmp_path / "dl", timeout=5, progress=False)
    assert path.read_bytes() == BODY and path.name == f"{SHA[:16]}-corpus.txt"
    assert http_server.hits == ["/corpus.txt"]
    assert fetch(url, SHA.upper(), tmp_path / "dl", timeout=5, progress=False) == path
    assert http_server.hits == ["/corpus.txt"]                 # cache hit: the server was not asked
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [path.name]


def test_sha_mismatch_is_an_error_and_nothing_is_kept(tmp_path, http_server):
    http_server.files["/corpus.txt"] = BODY
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"SHA-256 mismatch \\(expected {wrong}, downloaded {SHA}\\)"):
        fetch(http_server.url + "/corpus.txt", wrong, tmp_path / "dl", timeout=5, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_a_damaged_cached_copy_is_fetched_again(tmp_path, http_server):
    http_server.files["/corpus.txt"] = BODY
    url = http_server.url + "/corpus.txt"
    path = fetch(url, SHA, tmp_path / "dl", timeout=5, progress=False)
    path.write_bytes(b"truncated")
    assert fetch(url, SHA, tmp_path / "dl", timeout=5, progress=False).read_bytes() == BODY
    assert len(http_server.hits) == 2


def test_http_error_and_refused_connection_give_one_line(tmp_path, http_server):
    with pytest.raises(DataError, match="HTTP 404") as e:
        fetch(http_server.url + "/missing.txt", SHA, tmp_path / "dl", timeout=5, progress=False)
    assert "\n" not in str(e.value)
    with socket.socket() as s:          # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="cannot download .*check the network") as e:
        fetch(f"http://127.0.0.1:{port}/x.txt", SHA, tmp_path / "dl", timeout=5, progress=False)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "dl").iterdir()) == []


def test_url_source_prepares_once_and_splits_like_a_single_file(cache, http_server, make_spec, regs):
    http_server.files["/play.txt"] = BODY
    spec = make_spec({"kind": "url", "url": http_server.url + "/play.txt", "sha256": SHA, "timeout": 5})
    prep = prepare_data(spec, progress=False)
    text = prep.tokenizer.decode(prep.train.tolist()) + prep.tokenizer.decode(prep.val.tolist())
    assert text.encode() == BODY
    assert prep.tokenizer.decode(prep.val.tolist()).startswith("To be, or not to be, line 180.")
    assert (cache / "downloads" / f"{SHA[:16]}-play.txt").is_file()
    again = prepare_data(spec, progress=False)
    assert again.cache_dir == prep.cache_dir and http_server.hits == ["/play.txt"]
