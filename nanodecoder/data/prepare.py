"""Preparing data once: tokenize a source's splits into token files in a cache.

Layout of a prepared folder, ``<cache>/prepared/<source>-<tokenizer>-<key>``::

    manifest.json   format version, key, dtype, token/byte/document counts per
                    split, each file's size and SHA-256, tokenizer info
    train.bin       the train tokens, raw little-endian uint16 (uint32 when the
    val.bin         vocabulary exceeds 65536), read back with ``np.memmap``
    tokenizer/      the saved tokenizer (see ``tokenizers.py``)

The key hashes the source settings, the source's content fingerprint, the
tokenizer settings (plus versions of libraries that shape it) and the format
version.  A folder is built under a temporary name in the same parent and
renamed into place in one step, so an interrupted or concurrent preparation
never leaves a half-written folder under the final name; when another process
wins the race its folder is used.  Temporary folders of dead processes on this
host are removed the next time data is prepared.

Documents inside a split are joined by the tokenizer's end-of-text token, or by
``DOC_SEPARATOR`` text when it has none.  ``n_bytes`` counts the UTF-8 bytes of
the text the tokens spell (separator text included, end-of-text tokens
counting zero bytes); bits per byte uses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
from tqdm import tqdm

from ..config.declare import to_yaml

from .errors import DataError
from .download import sha256_of
from .kinds import load_tokenizer
from .sources import DOC_SEPARATOR, Corpus
from .spec import DataSpec
from .tokenizers import Tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
OWNER = "owner.json"
TOKENIZER_DIR = "tokenizer"
TMP_PREFIX = ".tmp-"
CHUNK_CHARS = 1 << 22   # text handed to the tokenizer at once
PIECE_CHARS = 1 << 20   # long documents are encoded in pieces of about this size
_CUT = re.compile(r"\n(?=[^\W\d_])")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$NANODECODER_CACHE``, else the user cache folder for nanodecoder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("NANODECODER_CACHE"):
        return Path(os.environ["NANODECODER_CACHE"]).expanduser()
    try:
        return Path(platformdirs.user_cache_dir("nanodecoder"))
    except ImportError:
        return Path.home() / ".cache" / "nanodecoder"


@dataclass(frozen=True, eq=False)
class Prepared:
    """Prepared data: the tokenizer, the two token arrays (memory-mapped; for token shards a
    :class:`~.shards.ShardedTokens` over many files) and the manifest."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    manifest: dict[str, Any]
    cache_dir: Path

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}' (available: {', '.join(SPLITS)})")
        return getattr(self, name)


def cache_key(spec: DataSpec, fingerprint: dict[str, Any], tokenizer_salt: dict[str, Any]) -> str:
    payload = {"format": FORMAT_VERSION, "source": to_yaml(spec.source), "content": fingerprint,
               "tokenizer": to_yaml(spec.tokenizer), "tokenizer_salt": tokenizer_salt}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prepare_data(spec: DataSpec, base_dir: str | Path = ".", cache_dir: str | Path | None = None,
                 progress: bool = True) -> Prepared:
    """Return the prepared data for ``spec``, tokenizing it first unless it is cached (a source of token ids,
    ``token_shards``, is read in place: :func:`open_tokenized`).

    ``base_dir`` is the blueprint's folder (relative source paths start there);
    ``cache_dir`` overrides the cache root; ``progress`` shows tqdm bars on stderr.
    """
    root = cache_root(cache_dir)
    source = spec.source.build(base_dir=Path(base_dir), cache_root=root)
    if source.tokenized:
        return open_tokenized(spec, source)
    tok_cls = spec.tokenizer.impl
    key, final = _prepared_folder(spec, source, root)
    parent = final.parent
    if not final.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{final.name}-"))
            tmp.chmod(0o755)       # mkdtemp's 0700 would hide the published folder from a shared cache
        except OSError as e:
            raise DataError(f"cannot write to the cache folder {parent} ({e.strerror}); "
                            "set NANODECODER_CACHE to a writable folder") from None
        remove_stale_temps(parent)
        try:
            (tmp / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            build_prepared(tmp, spec, key, source, tok_cls, progress)
            publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final, tokenizer_cls=tok_cls)


def _prepared_folder(spec: DataSpec, source, root: Path) -> tuple[str, Path]:
    """The cache key of ``spec``'s prepared data and the folder it lives in (``source``: the built source)."""
    key = cache_key(spec, source.fingerprint(), spec.tokenizer.impl.cache_salt(spec.tokenizer))
    return key, root / "prepared" / f"{spec.source.kind}-{spec.tokenizer.kind}-{key[:16]}"


def find_prepared(spec: DataSpec, base_dir: str | Path = ".", cache_dir: str | Path | None = None) -> Prepared | None:
    """The prepared data for ``spec`` when it is already in the cache, else None; tokenizes and downloads
    nothing (the source's content is fingerprinted: local files are read, a url source is not fetched)."""
    root = cache_root(cache_dir)
    source = spec.source.build(base_dir=Path(base_dir), cache_root=root)
    if source.tokenized:
        return open_tokenized(spec, source)
    _, final = _prepared_folder(spec, source, root)
    if not (final / MANIFEST).is_file():
        return None
    return load_prepared(final, tokenizer_cls=spec.tokenizer.impl)


def open_tokenized(spec: DataSpec, source) -> Prepared:
    """The prepared data of a source whose files hold token ids (``source.tokenized``): its splits read in place
    (memory-mapped, nothing copied into the cache) with the tokenizer built from its spec.  The manifest has no
    byte counts (the text is not at hand), so no bits per byte are reported for such data."""
    why = source.tokenizer_problem(spec.tokenizer)
    if why:
        raise DataError(f"data.tokenizer: {why}")
    splits = source.splits()
    tokenizer = spec.tokenizer.impl.build(spec.tokenizer, Corpus((), (), {}))
    manifest = {
        "format_version": FORMAT_VERSION, "dtype": np.dtype(splits["train"].dtype).name,
        "source": to_yaml(spec.source), "source_info": source.info(splits),
        "tokenizer": {**tokenizer.info(), "spec": to_yaml(spec.tokenizer)}, "separator": "eot",
        "n_tokens": {s: len(splits[s]) for s in SPLITS}, "n_bytes": {s: None for s in SPLITS},
    }
    folder = Path(os.path.commonpath([str(p.parent) for s in SPLITS for p in splits[s].paths]))
    return Prepared(tokenizer, splits["train"], splits["val"], manifest, folder)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; losing the race to another process is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete temporary folders left by dead processes of this host (POSIX only)."""
    removed = []
    if os.name != "posix":
        return removed
    host = socket.gethostname()
    for tmp in parent.glob(TMP_PREFIX + "*"):
        try:
            owner = json.loads((tmp / OWNER).read_text())
            if owner["host"] != host or _alive(int(owner["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def build_prepared(folder: Path, spec: DataSpec, key: str, source, tok_cls, progress: bool) -> None:
    """Load the corpus, build the tokenizer and write tokens and manifest into ``folder``."""
    corpus = source.load(progress=progress)
    tokenizer = tok_cls.build(spec.tokenizer, corpus)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32)
    tokenizer.save(folder / TOKENIZER_DIR)
    stats = {s: write_split(folder / f"{s}.bin", corpus.split(s), tokenizer, dtype, s, progress)
             for s in SPLITS}
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "dtype": dtype.name,
        "source": to_yaml(spec.source), "source_info": corpus.info,
        "tokenizer": {**tokenizer.info(), "spec": to_yaml(spec.tokenizer)},
        "separator": "eot" if tokenizer.eot_id is not None else DOC_SEPARATOR,
        "n_tokens": {s: stats[s]["n_tokens"] for s in SPLITS},
        "n_bytes": {s: stats[s]["n_bytes"] for s in SPLITS},
        "n_docs": {s: len(corpus.split(s)) for s in SPLITS},
        "files": {s: {"name": f"{s}.bin", "size": stats[s]["size"], "sha256": stats[s]["sha256"]}
                  for s in SPLITS},
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    (folder / OWNER).unlink()


def text_pieces(doc: str, limit: int = PIECE_CHARS) -> list[str]:
    """Cut a long document into pieces of at least ``limit`` characters, each
    cut just after a newline that is followed by a letter.

    The split patterns of byte-level BPE (GPT-2, GPT-4, o200k and rustbpe's)
    never put a newline and a following letter in one pre-token, so encoding
    the pieces one by one gives exactly the tokens of the whole document.
    """
    pieces, start = [], 0
    while len(doc) - start > limit:
        m = _CUT.search(doc, start + limit - 1)
        if m is None:
            break
        pieces.append(doc[start:m.end()])
        start = m.end()
    if start < len(doc):
        pieces.append(doc[start:])
    return pieces


def write_split(path: Path, docs, tokenizer: Tokenizer, dtype: np.dtype, name: str,
                progress: bool) -> dict[str, Any]:

    if tokenizer.eot_id is not None:
        sep_ids, sep_bytes = np.array([tokenizer.eot_id]), 0
    else:
        sep_ids, sep_bytes = tokenizer.encode_array(DOC_SEPARATOR), len(DOC_SEPARATOR.encode())
    h, counts = hashlib.sha256(), {"n_tokens": 0, "n_bytes": 0}

    with open(path, "wb") as f, tqdm(total=sum(len(d) for d in docs), unit="char", unit_scale=True,
                                     desc=f"tokenize {name}", file=sys.stderr, disable=not progress) as bar:
        def put(ids: np.ndarray, n_bytes: int) -> None:
            buf = np.asarray(ids).astype(dtype).tobytes()
            f.write(buf)
            h.update(buf)
            counts["n_tokens"] += len(ids)
            counts["n_bytes"] += n_bytes

        def flush(batch: list[str | None]) -> None:
            encoded = iter(tokenizer.encode_many([p for p in batch if p is not None]))
            for piece in batch:
                if piece is None:
                    put(sep_ids, sep_bytes)
                else:
                    put(next(encoded), len(piece.encode("utf-8")))
                    bar.update(len(piece))

        batch, size = [], 0
        for i, doc in enumerate(docs):
            if i:
                batch.append(None)
            for piece in text_pieces(doc):
                batch.append(piece)
                size += len(piece)
                if size >= CHUNK_CHARS:
                    flush(batch)
                    batch, size = [], 0
        flush(batch)
        f.flush()
        os.fsync(f.fileno())
    return {**counts, "size": path.stat().st_size, "sha256": h.hexdigest()}


def load_prepared(folder: str | Path, catalog=None, verify_checksums: bool = False, tokenizer_cls=None) -> Prepared:
    """Open a prepared folder, checking its manifest and file sizes (and SHA-256 if asked)."""
    folder = Path(folder)
    fix = f"delete {folder} and run again to prepare it afresh"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"prepared data at {folder} is incomplete (no {MANIFEST}); {fix}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"prepared data at {folder} has an unreadable {MANIFEST} ({e}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"prepared data at {folder} has format {manifest.get('format_version')!r}, "
                        f"this nanodecoder reads {FORMAT_VERSION}; {fix}")
    try:
        dtype = np.dtype(manifest["dtype"])
        arrays = {s: _open_split(folder, manifest, s, dtype, verify_checksums, fix) for s in SPLITS}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"prepared data at {folder} has a damaged {MANIFEST} ({e!r}); {fix}") from None
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR, catalog, tokenizer_cls)
    return Prepared(tokenizer, arrays["train"], arrays["val"], manifest, folder)


def _open_split(folder: Path, manifest: dict, split: str, dtype: np.dtype, verify: bool, fix: str):
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"dtype {dtype}")
    info = manifest["files"][split]
    n = int(manifest["n_tokens"][split])
    if Path(info["name"]).name != info["name"]:
        raise ValueError(f"file name {info['name']!r}")
    path = folder / info["name"]
    expected = n * dtype.itemsize
    actual = path.stat().st_size if path.is_file() else None
    if actual != expected or info["size"] != expected:
        got = "missing" if actual is None else f"{actual} bytes"
        raise DataError(f"prepared data at {folder} is damaged: {info['name']} is {got}, "
                        f"expected {expected}; {fix}")
    if verify:
        if sha256_of(path) != info["sha256"]:
            raise DataError(f"prepared data at {folder} is damaged: {info['name']} fails its SHA-256; {fix}")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
