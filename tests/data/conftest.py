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
