"""``token_shards``: already tokenized data in llm.c's ``.bin`` shard format, read in place (nothing cached).

A shard is a header of 256 little-endian int32 -- ``header[0]`` the magic 20240520, ``header[1]`` the
version 1, ``header[2]`` the number of tokens -- followed by the tokens as little-endian uint16.  A folder of
them, as ``tools/prepare_fineweb.py`` (and llm.c's ``fineweb.py``) writes it::

    edu_fineweb_val_000000.bin      the first shard: validation
    edu_fineweb_train_000001.bin    the rest: train, in file-name order
    ...

:class:`ShardedTokens` shows the shards of one split as one 1-D token array without loading them: its length,
slices (a window may straddle two shards) and ``ndim``/``dtype``/``shape``, which is what the batch sampler
and the evaluation read.  Each shard is memory-mapped the first time a window touches it.

:class:`ShardWriter` writes shards: each to a temporary name in the target folder, renamed into place once it
is complete, so an interrupted run never leaves a half-written shard under a final name.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config.declare import Kind, declared, param
from ..config.loader import blueprint_path
from .errors import DataError
from .sources import Corpus, DataSource, file_type

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
SPLIT_NAMES = ("train", "val")
#: The tokenizer the shards are written with (tiktoken's gpt2 encoding, ids < 2**16).
TOKENIZER_KIND, TOKENIZER_NAME = "tiktoken", "gpt2"


def shard_name(prefix: str, split: str, index: int) -> str:
    """``<prefix>_<split>_<index:06d>.bin``, llm.c's naming."""
    return f"{prefix}_{split}_{index:06d}.bin"


def header(n_tokens: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[2] = MAGIC, VERSION, n_tokens
    return h.tobytes()


def check_uint16(tokens: np.ndarray, where: str) -> None:
    """A DataError naming ``where`` unless every id of ``tokens`` fits a uint16."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2 ** 16):
        raise DataError(f"{where}token ids must lie in [0, 65536) to be stored as uint16 "
                        f"(got {int(tokens.min())}..{int(tokens.max())}); shards hold GPT-2-sized vocabularies")


def write_shard(path: str | Path, tokens: np.ndarray, checked: bool = False) -> Path:
    """Write ``tokens`` (ids < 2**16) as one shard at ``path``: to a temporary name first, then renamed.
    ``checked``: the caller has already checked the ids' range."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if not checked:
        check_uint16(tokens, f"{path}: ")
    if len(tokens) >= 2 ** 31:
        raise DataError(f"{path}: {len(tokens):,} tokens do not fit one shard's int32 count; use smaller shards")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header(len(tokens)))
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_header(path: str | Path) -> int:
    """The number of tokens of the shard at ``path``, after checking its header against the file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: {len(raw)} bytes, too short for the {HEADER_BYTES}-byte header of a token shard")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != MAGIC:
        raise DataError(f"{path}: not a token shard (magic {int(h[0])}, expected {MAGIC}: llm.c's .bin format, "
                        "as tools/prepare_fineweb.py writes it)")
    if h[1] != VERSION:
        raise DataError(f"{path}: token shard version {int(h[1])}, this nanodecoder reads version {VERSION} "
                        "(uint16 tokens)")
    n = int(h[2])
    expected = HEADER_BYTES + n * TOKEN_DTYPE.itemsize
    if n < 0 or size != expected:
        raise DataError(f"{path}: the header says {n:,} tokens ({expected:,} bytes with the header) but the file "
                        f"has {size:,} bytes: truncated or damaged; write the shard again")
    return n


class ShardedTokens:
    """The tokens of several shards as one read-only 1-D array (``len``, integer and slice indexing with step 1,
    ``ndim``, ``shape``, ``dtype``); slices are copied out of memory-mapped files, so 20 GB of shards cost no
    memory until read."""

    ndim = 1
    dtype = TOKEN_DTYPE

    def __init__(self, paths: list[Path], counts: list[int] | None = None):
        self.paths = [Path(p) for p in paths]
        counts = [read_header(p) for p in self.paths] if counts is None else [int(c) for c in counts]
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self):,} tokens in {len(self.paths)} shard(s))"

    def _shard(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            if self.counts[i] == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(self.paths[i], dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(self.counts[i],))
            self._maps[i] = m
        return m

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens supports slices with step 1 only")
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for {n} tokens")
            return self._range(i, i + 1)[0]
        raise TypeError(f"ShardedTokens indices are integers or slices, not {type(key).__name__}")

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)``: a view inside one shard, a copy joined from several."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        i = first
        while start < stop and i < len(self.paths):
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            if hi > start:
                parts.append(self._shard(i)[start - lo:min(stop, hi) - lo])
                start = min(stop, hi)
            i += 1
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, len(self))
        return np.array(out, dtype=dtype) if dtype is not None else np.array(out)


class ShardWriter:
    """Tokens in, full shards out: the first shard is ``<prefix>_val_000000.bin``, the others
    ``<prefix>_train_<index>.bin``; every shard but the last holds exactly ``shard_size`` tokens (documents are cut
    across shard boundaries).  ``close()`` writes the last, partial shard."""

    def __init__(self, folder: str | Path, prefix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.folder, self.prefix, self.shard_size = Path(folder), prefix, int(shard_size)
        self.buffer = np.empty(self.shard_size, dtype=TOKEN_DTYPE)
        self.filled = 0
        self.written: list[Path] = []
        self.n_tokens = 0

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens)
        check_uint16(tokens, "")
        at = 0
        while at < len(tokens):
            take = min(len(tokens) - at, self.shard_size - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[at:at + take]
            self.filled += take
            at += take
            if self.filled == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        index = len(self.written)
        name = shard_name(self.prefix, "val" if index == 0 else "train", index)
        self.written.append(write_shard(self.folder / name, self.buffer[:self.filled], checked=True))
        self.n_tokens += self.filled
        self.filled = 0

    def close(self) -> list[Path]:
        if self.filled:
            self._flush()
        return self.written


class TokenShardsSource(DataSource):
    """Already tokenized GPT-2 token shards in llm.c's .bin format (tools/prepare_fineweb.py writes them): a folder
    or glob; files matching train_pattern are train, val_pattern validation, each in file-name order. Read in place,
    memory-mapped; needs the tokenizer {kind: tiktoken, name: gpt2}."""

    tokenized: ClassVar[bool] = True

    @declared
    class Spec(Kind):
        path: str = param(doc="The folder holding the shards (or a glob of .bin files); relative paths start at "
                              "the blueprint's folder, ~ is expanded.", min_length=1)
        train_pattern: str = param("*_train_*.bin", doc="File names (shell pattern) of the train shards.",
                                   min_length=1)
        val_pattern: str = param("*_val_*.bin", doc="File names (shell pattern) of the validation shards.",
                                 min_length=1)

    @classmethod
    def tokenizer_problem(cls, tokenizer) -> str | None:
        if tokenizer.kind == TOKENIZER_KIND and getattr(tokenizer, "name", None) == TOKENIZER_NAME:
            return None
        given = f"{tokenizer.kind}" + (f" {tokenizer.name}" if getattr(tokenizer, "name", None) else "")
        return (f"the token_shards source holds GPT-2 token ids: use {{kind: {TOKENIZER_KIND}, name: "
                f"{TOKENIZER_NAME}}} (with files: DIR offline), not {given}")

    def _where(self) -> Path:
        return Path(os.path.normpath(blueprint_path(os.path.expanduser(self.spec.path), self.base_dir)))

    def files(self, split: str) -> list[Path]:
        """The shards of ``split`` (``train`` or ``val``), sorted by name; none is a DataError."""
        where = self._where()
        pattern = self.spec.train_pattern if split == "train" else self.spec.val_pattern
        key = "train_pattern" if split == "train" else "val_pattern"
        if any(c in str(where) for c in "*?["):
            candidates = [Path(p) for p in glob.glob(str(where), recursive=True)]
            found = sorted(p for p in candidates if p.match(pattern) and os.path.isfile(p))
            if not candidates:
                raise DataError(f"data.source.path: the glob '{self.spec.path}' matched no files (searched {where})"
                                "; write the shards with tools/prepare_fineweb.py")
        elif where.is_dir():
            found = sorted(p for p in where.glob(pattern) if p.is_file())
        elif where.exists():
            raise DataError(f"data.source.path: '{self.spec.path}' is {file_type(where)}, not a folder of token "
                            "shards")
        else:
            raise DataError(f"data.source.path: the shard folder '{self.spec.path}' does not exist (looked for "
                            f"{where}); write it with tools/prepare_fineweb.py --out DIR")
        if not found:
            raise DataError(f"data.source.{key}: no {split} shards matching '{pattern}' in {where}")
        return found

    def check(self) -> None:
        for split in SPLIT_NAMES:
            for f in self.files(split):
                if not os.access(f, os.R_OK):
                    raise DataError(f"data.source.path: cannot read {f} (permission denied)")

    def splits(self) -> dict[str, ShardedTokens]:
        """Each split's tokens, every shard's header checked."""
        return {split: ShardedTokens(self.files(split)) for split in SPLIT_NAMES}

    def info(self, splits: dict[str, ShardedTokens]) -> dict[str, Any]:
        return {"folder": str(self._where()), "shards": {s: [p.name for p in t.paths] for s, t in splits.items()}}

    def fingerprint(self) -> dict[str, Any]:
        return {s: [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.files(s)] for s in SPLIT_NAMES}

    def load(self, progress: bool = True) -> Corpus:
        raise DataError("data.source: token_shards holds token ids, not text; it is read by prepare_data directly")
