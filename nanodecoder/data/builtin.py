"""``builtin``: the data files shipped inside the package (``nanodecoder/data/corpora/``), read offline.

A blueprint names them, never their path, so the same blueprint runs from a
checkout and from an installed copy, whatever the working folder::

    data:
      source: {kind: builtin, name: tinyshakespeare}   # a text corpus (the data source below)
    finetune:
      data: builtin:instruction_data                    # a set of instruction records (finetune.data)

The names form a closed list, :data:`SHIPPED`, which also records each file's
size and SHA-256: a file that differs from its record (edited, truncated,
line endings converted) is an error, never used.  Where each file comes from
and under which license is ``corpora/README.md``.

A text corpus is split like a single text file of the ``text`` source: its
last ``val_fraction`` of characters, cut at a line boundary, is validation, so
``{kind: builtin, name: tinyshakespeare}`` tokenizes to the same tokens as
``{kind: text, path: tinyshakespeare.txt}`` on the same bytes (the cache keys
differ: the source settings are part of the key).

The Python standard library corpus stays its own kind, ``python_stdlib``: it is
not a file of this package but the running Python's, and it has parameters of
its own (``max_bytes``, a file-level split).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config.declare import Kind, declared, param
from ..resources import corpora_dir
from .errors import DataError
from .sources import VAL_FRACTION_DOC, Corpus, DataSource, split_documents

#: How a blueprint names a shipped file where it would give a path (``finetune.data: builtin:instruction_data``).
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Shipped:
    """One shipped file: its name in ``corpora/``, size, SHA-256, and what it holds (``text``: a corpus for
    ``data.source``; ``instructions``: Alpaca records for ``finetune.data``)."""

    file: str
    size: int
    sha256: str
    content: Literal["text", "instructions"]


SHIPPED: dict[str, Shipped] = {
    "tinyshakespeare": Shipped("tinyshakespeare.txt", 1_115_394,
                               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "text"),
    "instruction_data": Shipped("instruction_data.json", 203_524,
                                "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", "instructions"),
}

TEXT_CORPORA = tuple(name for name, s in SHIPPED.items() if s.content == "text")


def shipped_names(content: str | None) -> tuple[str, ...]:
    return tuple(name for name, s in SHIPPED.items() if s.content == content)


def is_builtin(raw: str) -> bool:
    """True when a path-valued setting names a shipped file (``builtin:NAME``) instead of a path."""
    return raw.startswith(BUILTIN_PREFIX)


def shipped_bytes(name: str, content: str | None, key: str) -> tuple[Path, bytes]:
    """The path and bytes of the shipped file ``name`` holding ``content``, checked against its record;
    DataError (naming ``key``) for an unknown name, a missing file or one that differs from its record."""
    names = shipped_names(content)
    if name not in names:
        if not names:
            raise DataError(f"{key}: no shipped file fits here (built-in '{name}'); give a file path")
        raise DataError(f"{key}: unknown built-in '{name}' (available: {', '.join(names)})")
    entry = SHIPPED[name]
    try:
        path = corpora_dir() / entry.file
        data = path.read_bytes()
    except OSError as e:         # the folder missing (corpora_dir), or the file
        raise DataError(f"{key}: cannot read the shipped file {entry.file} ({e.strerror or e}); "
                        "reinstall nanodecoder") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
        raise DataError(f"{key}: the shipped file {path} is not the one nanodecoder ships ({len(data):,} bytes, "
                        f"SHA-256 {digest[:16]}..., expected {entry.size:,} bytes, {entry.sha256[:16]}...); "
                        "reinstall nanodecoder")
    return path, data


def builtin_file(raw: str, content: str | None, key: str) -> Path:
    """The checked path of ``raw`` = ``builtin:NAME`` (a shipped file holding ``content``)."""
    return shipped_bytes(raw[len(BUILTIN_PREFIX):], content, key)[0]


class BuiltinSource(DataSource):
    """A text corpus shipped inside the package (tinyshakespeare: 1.1 MB of Shakespeare, public domain), read
    offline and checked by SHA-256; the last val_fraction (cut at a line boundary) is validation."""

    @declared
    class Spec(Kind):
        name: Literal[TEXT_CORPORA] = param(doc="Which shipped corpus: tinyshakespeare (nanoGPT's character-level "
                                                "benchmark, 1,115,394 bytes).")
        val_fraction: float = param(0.1, doc=VAL_FRACTION_DOC, exclusive_minimum=0, maximum=0.5)

    def _bytes(self) -> bytes:
        return shipped_bytes(self.spec.name, "text", "data.source.name")[1]

    def check(self) -> None:
        self._bytes()

    def fingerprint(self) -> dict[str, Any]:
        return {"sha256": SHIPPED[self.spec.name].sha256}      # load() refuses bytes that differ from it

    def load(self, progress: bool = True) -> Corpus:
        train, val = split_documents([self._bytes().decode("utf-8")], self.spec.val_fraction)
        return Corpus(tuple(train), tuple(val), {"builtin": self.spec.name})
