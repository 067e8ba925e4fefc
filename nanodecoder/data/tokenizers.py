"""Tokenizers: the common interface, ``byte`` and ``char`` (``bpe`` and
``tiktoken`` live in ``bpe.py``), and :func:`load_tokenizer`.

Every tokenizer offers ``encode(str) -> list[int]``, ``decode(list[int]) ->
str``, ``vocab_size``, ``eot_id`` (or None) and ``save(dir)``;
:func:`load_tokenizer` restores one from that folder, offline.  A folder holds
``tokenizer.json`` (kind, vocabulary size, end-of-text id and the kind's own
fields) and, for ``bpe``/``tiktoken``, ``ranks.tiktoken`` in tiktoken's format
(one ``base64(token bytes) rank`` per line).  Nothing is pickled.

Text is encoded as plain text: a special token's spelling inside the corpus
(e.g. ``<|endoftext|>``) is ordinary characters, so ``decode(encode(x)) == x``
for any string (any characters for ``byte``, ``bpe`` and ``tiktoken``; the
corpus's characters for ``char``).  ``encode_special`` is for text that a chat
template wrote: there the special tokens' spellings are the special tokens.

A tokenizer may carry a chat template (``chat``, see ``chat.py``; an imported
model's), saved beside it as ``chat.json``.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from ..config.declare import Kind
from .chat import ChatTemplate, save_chat
from .errors import DataError
from .sources import DOC_SEPARATOR, Corpus

META_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Base of the registered tokenizers.

    Class protocol: ``Spec`` (frozen YAML parameters), ``build(spec, corpus)``,
    ``from_saved(meta, directory)``, ``known_vocab_size(spec)`` and
    ``cache_salt(spec)`` (versions of libraries whose output it depends on).
    """

    kind: ClassVar[str]
    Spec: ClassVar[type[Kind]] = Kind
    vocab_size: int
    eot_id: int | None = None
    chat: ChatTemplate | None = None       # an imported model's chat template, if it shipped one
    #: False where ``build`` ignores the corpus (the tokenizer is known before any data is read)
    needs_corpus: ClassVar[bool] = True

    @classmethod
    def known_vocab_size(cls, spec) -> int | None:
        return None

    @classmethod
    def cache_salt(cls, spec) -> dict[str, Any]:
        return {}

    @classmethod
    @abstractmethod
    def build(cls, spec, corpus: Corpus) -> "Tokenizer":
        """A tokenizer for ``spec``, fitted to the corpus where the kind learns from data."""

    @classmethod
    @abstractmethod
    def from_saved(cls, meta: dict[str, Any], directory: Path) -> "Tokenizer":
        """Restore from ``tokenizer.json``'s fields (``meta``) and the folder's other files."""

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """The token ids of ``text`` as a 1-D integer array."""

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def special_tokens(self) -> dict[str, int]:
        """The special tokens' texts and ids (none for byte and char)."""
        return {}

    def encode_special(self, text: str) -> list[int]:
        """The ids of ``text`` in which each special token's spelling is that special token (chat templates);
        kinds without special tokens encode it as plain text."""
        return self.encode(text)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; ids outside the vocabulary are a DataError."""

    def meta(self) -> dict[str, Any]:
        """The kind's own fields of ``tokenizer.json``."""
        return {}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, **self.meta()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if self.chat is not None:
            save_chat(self.chat, directory)
        return directory

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def _bad_ids(self, ids) -> DataError:
        return DataError(f"token ids outside the {self.kind} tokenizer's vocabulary of {self.vocab_size}: "
                         f"{[i for i in ids if not 0 <= int(i) < self.vocab_size][:5]}")


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: 256 ids, any text, no end-of-text token."""

    kind = "byte"
    vocab_size = 256
    needs_corpus = False

    @classmethod
    def known_vocab_size(cls, spec) -> int:
        return 256

    @classmethod
    def build(cls, spec, corpus: Corpus) -> "ByteTokenizer":
        return cls()

    @classmethod
    def from_saved(cls, meta, directory) -> "ByteTokenizer":
        return cls()

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return bytes(ids).decode("utf-8", errors="replace")
        except ValueError:
            raise self._bad_ids(ids) from None


class CharTokenizer(Tokenizer):
    """One token per character seen in the corpus (train and validation); other characters cannot be encoded.

    Ids follow code point order.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise DataError("char tokenizer: the vocabulary must be a non-empty list of single characters")
        self.vocab_size = len(self.chars)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def build(cls, spec, corpus: Corpus) -> "CharTokenizer":
        seen = set(DOC_SEPARATOR)
        for doc in (*corpus.train, *corpus.val):
            seen.update(doc)
        return cls(seen)

    @classmethod
    def from_saved(cls, meta, directory) -> "CharTokenizer":
        return cls(meta["chars"])

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        bad = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
        if bad.any():
            ch = chr(int(codes[np.argmax(bad)]))
            raise DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's vocabulary "
                            f"of {self.vocab_size} characters seen in the corpus; use the byte or bpe "
                            "tokenizer for text with new characters")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise self._bad_ids(ids)
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict[str, Any]:
        return {"chars": self.chars}
