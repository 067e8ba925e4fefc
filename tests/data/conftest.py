"""Fixtures of the data-pipeline tests: fresh registries, a private cache, a local HTTP server."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from nanodecoder.config import build
from nanodecoder.config.registry import new_catalog
from nanodecoder.data import DataSpec, register


@pytest.fixture
def regs():
    """Registries holding only the built-in data kinds (no plug-ins, no other modules)."""
    out = new_catalog()
    register(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """NANODECODER_CACHE pointed at an empty folder of this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("NANODECODER_CACHE", str(root))
    return root


@pytest.fixture
def make_spec(regs):
    def make(source, tokenizer=None, sampling="random"):
        return build(DataSpec, {"source": source, "tokenizer": tokenizer or {"kind": "byte"},
                                "sampling": sampling}, regs)
    return make


@pytest.fixture
def http_server(monkeypatch):
    """A server on 127.0.0.1 serving ``files`` (url path -> bytes), recording each request in ``hits``."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", files=files, hits=hits)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory):
    """A byte-level BPE folder (vocab.json + merges.txt, ~560 tokens, <|endoftext|> = 0) standing in for GPT-2's
    files, which cannot be downloaded here; use it with ``as_gpt2``."""
    pytest.importorskip("tokenizers")
    from test_gpt2_offline import train_bpe
    folder = tmp_path_factory.mktemp("gpt2_files")
    train_bpe(folder)
    return folder


@pytest.fixture
def as_gpt2(monkeypatch):
    """The GPT-2 identity check (``hf_bpe.gpt2_mismatch``) accepts the stand-in vocabulary of ``gpt2_files``."""
    from nanodecoder.data import hf_bpe
    monkeypatch.setattr(hf_bpe, "gpt2_mismatch", lambda enc: None)
