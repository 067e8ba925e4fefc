"""Data sources: where the raw text comes from (``text`` and ``url``; see
``stdlib.py`` for ``python_stdlib``, ``builtin.py`` for ``builtin`` (corpora shipped in the package)
and ``shards.py`` for ``token_shards``, whose files hold token ids).

A source class (registered in category ``data_source``) has a frozen
``Spec`` (its YAML parameters, ``kind`` included) and is built as
``cls(spec, base_dir=..., cache_root=...)``.  It offers

* ``fingerprint()``: a cheap JSON-able summary of its content, part of the
  prepared-data cache key (so edited files give a new cache entry);
* ``load(progress)``: the :class:`Corpus`, documents already split into train
  and validation.

Splits never depend on randomness: a single text is cut at a line boundary
with its last ``val_fraction`` as validation (like nanoGPT).
"""
from __future__ import annotations

import glob
from abc import ABC, abstractmethod
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config.declare import Kind, declared, param
from .download import fetch
from .errors import DataError
from ..config.loader import blueprint_path

#: Text put between documents when the tokenizer has no end-of-text token.
DOC_SEPARATOR = "\n\n"
VAL_FRACTION_DOC = "Fraction of the text, from its end, held out for validation."


@dataclass(frozen=True)
class Corpus:
    """Documents of each split, in a fixed order, plus a JSON-able description."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    info: dict[str, Any]

    def split(self, name: str) -> tuple[str, ...]:
        return {"train": self.train, "val": self.val}[name]


class DataSource(ABC):
    """Base of the registered sources; see the module docstring for the protocol."""

    Spec: ClassVar[type[Kind]]
    #: True for a source whose files hold token ids already (``token_shards``): ``prepare_data`` reads its
    #: ``splits()`` in place instead of tokenizing ``load()``'s text into the cache.
    tokenized: ClassVar[bool] = False

    @classmethod
    def tokenizer_problem(cls, tokenizer) -> str | None:
        """Why the built tokenizer spec ``tokenizer`` cannot go with this source (None: it can)."""
        return None

    def __init__(self, spec, base_dir: Path, cache_root: Path):
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.cache_root = Path(cache_root)

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """A cheap, JSON-able summary of the content (part of the cache key)."""

    @abstractmethod
    def load(self, progress: bool = True) -> Corpus:
        """The documents of both splits."""

    def check(self) -> None:
        """Raise DataError for what is wrong without reading the content (a missing file, a device given as a
        file, ...): training's checks before any work, and ``--dry-run``'s.  Offline and cheap."""


def read_utf8(path: Path) -> str:
    """A file's text, exactly as stored (no newline translation); UTF-8 only."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 "
                        "or leave it out with a glob") from None


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut the concatenated documents so the last ``val_fraction`` of characters is validation.

    The cut falls at the line boundary nearest the target inside the document
    that holds it (that document's head stays in train, its tail goes to val);
    a text without a usable line boundary is cut at the exact character.
    """
    docs = [d for d in docs if d]
    total = sum(len(d) for d in docs)
    if total < 2:
        raise DataError(f"the source has {total} character(s) of text; it needs enough to split "
                        "into train and validation")
    target = min(max(1, round(total * (1.0 - val_fraction))), total - 1)
    start = 0
    for i, doc in enumerate(docs):
        if start + len(doc) >= target:
            cut = _line_cut(doc, target - start)
            head, tail = doc[:cut], doc[cut:]
            train = docs[:i] + ([head] if head else [])
            val = ([tail] if tail else []) + docs[i + 1:]
            return train, val
        start += len(doc)
    raise AssertionError("unreachable: the target lies inside the text")


def _line_cut(doc: str, target: int) -> int:
    """The position just after a newline nearest ``target`` (0 < pos < len), else ``target``."""
    before = doc.rfind("\n", 0, target)
    after = doc.find("\n", target - 1)
    options = [p + 1 for p in (before, after) if p != -1 and 0 < p + 1 < len(doc)]
    return min(options, key=lambda p: abs(p - target)) if options else target


def file_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextSource(DataSource):
    """Your own UTF-8 text: one file, a folder (every non-hidden file, recursively) or a glob; the last val_fraction
    (cut at a line boundary) is validation.

    Relative paths are relative to the blueprint's folder.  Files are read in
    sorted order, each one a document.
    """

    @declared
    class Spec(Kind):
        path: str = param(doc="A file, folder or glob (** allowed); relative paths start at the blueprint's folder, "
                              "~ is expanded.", min_length=1)
        val_fraction: float = param(0.1, doc=VAL_FRACTION_DOC, exclusive_minimum=0, maximum=0.5)

    def __init__(self, spec, base_dir: Path, cache_root: Path):
        super().__init__(spec, base_dir, cache_root)
        self._texts: list[str] | None = None

    def files(self) -> list[Path]:
        raw = os.path.expanduser(self.spec.path)
        path = blueprint_path(raw, self.base_dir)
        if any(c in str(path) for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"data.source.path: the glob '{self.spec.path}' matched no files "
                                f"(searched {path})")
            return found
        if path.is_dir():
            found = sorted(
                Path(d, f) for d, dirs, names in os.walk(path)
                for f in names if not f.startswith(".") and not _hidden(Path(d).relative_to(path))
                and os.path.isfile(os.path.join(d, f)))      # regular files (and links to them) only
            if not found:
                raise DataError(f"data.source.path: the directory {path} holds no files")
            return found
        if path.is_file():
            return [path]
        if path.exists():
            raise DataError(f"data.source.path: '{self.spec.path}' is not a regular file ({file_type(path)}); "
                            "give a UTF-8 text file, a folder of them or a glob")
        raise DataError(f"data.source.path: '{self.spec.path}' does not exist (looked for {path})")

    def check(self) -> None:
        for f in self.files():
            if not os.access(f, os.R_OK):
                raise DataError(f"data.source.path: cannot read {f} (permission denied)")

    def _read(self) -> list[str]:
        if self._texts is None:
            self._texts = [read_utf8(f) for f in self.files()]
        return self._texts

    def fingerprint(self) -> dict[str, Any]:
        return {"files": [file_digest(t) for t in self._read()]}

    def load(self, progress: bool = True) -> Corpus:
        texts = self._read()
        train, val = split_documents(texts, self.spec.val_fraction)
        return Corpus(tuple(train), tuple(val), {"n_files": len(texts)})


def file_type(path: Path) -> str:
    """What ``path`` is, in words: 'a directory', 'a character device', ... ('missing' when it does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


class UrlSource(DataSource):
    """A UTF-8 text file downloaded once over http(s) into the cache, refused unless its SHA-256 matches; split
    like a single text file (kept in ``<cache>/downloads``)."""

    @declared
    class Spec(Kind):
        url: str = param(doc="The http:// or https:// address of the file.", pattern="^https?://")
        sha256: str = param(doc="The file's SHA-256 as 64 hex digits; a download that differs is an error and is "
                                "not kept.", pattern="^[0-9a-fA-F]{64}$")
        val_fraction: float = param(0.1, doc=VAL_FRACTION_DOC, exclusive_minimum=0, maximum=0.5)
        timeout: float = param(60.0, doc="Seconds to wait for the server before giving up.", exclusive_minimum=0)

    def fingerprint(self) -> dict[str, Any]:
        return {"sha256": self.spec.sha256.lower()}

    def load(self, progress: bool = True) -> Corpus:
        path = fetch(self.spec.url, self.spec.sha256, self.cache_root / "downloads",
                     timeout=self.spec.timeout, progress=progress)
        train, val = split_documents([read_utf8(path)], self.spec.val_fraction)
        return Corpus(tuple(train), tuple(val), {"file": path.name})
