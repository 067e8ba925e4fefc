"""Downloading a file whose SHA-256 is known, into a cache, never half-written."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .errors import DataError

_CHUNK = 1 << 16


def cached_name(url: str, sha256: str) -> str:
    """``<first 16 hex of sha256>-<file name of the url>`` (safe characters only)."""
    base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:80]
    return f"{sha256.lower()[:16]}-{base}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, sha256: str, dest_dir: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Return the cached copy of ``url`` in ``dest_dir``, downloading it if needed.

    The download goes to a temporary file in ``dest_dir``; only a file whose
    SHA-256 equals ``sha256`` is renamed into place, so the cache never holds a
    partial or wrong file.  A cached copy is re-hashed before use (a damaged
    one is fetched again).
    """
    sha256 = sha256.lower()
    dest_dir = Path(dest_dir)
    dest = dest_dir / cached_name(url, sha256)
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        dest.unlink()
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(url, out, timeout, progress)
            out.flush()
            os.fsync(out.fileno())
        if digest != sha256:
            raise DataError(f"{url}: SHA-256 mismatch (expected {sha256}, downloaded {digest}); "
                            "check data.source.url and data.source.sha256")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dest


def _download(url: str, out, timeout: float, progress: bool) -> str:

    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "nanodecoder"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B",
                      unit_scale=True, desc=f"download {os.path.basename(url)}",
                      file=sys.stderr, disable=not progress) as bar:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    h.update(block)
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}; check data.source.url") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url}: {reason}; check the network, or download the file "
                        "yourself and use data.source kind: text") from None
    return h.hexdigest()
