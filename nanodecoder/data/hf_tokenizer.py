"""Tokenizer kind ``hf``: a Hugging Face fast tokenizer (``tokenizer.json``), run by the ``tokenizers`` library.

An imported model keeps its own tokenizer.  The run folder's ``tokenizer/`` holds our
``tokenizer.json`` (kind, vocabulary size, end-of-text id, like every kind) and the Hugging
Face file beside it as ``hf_tokenizer.json`` (plus ``tokenizer_config.json`` when the model had
one, for export).  The file is data (a JSON description of the tokenizer), nothing is executed.

Text is encoded as plain text, without the special tokens a chat template or ``add_special_tokens``
would add (like our other kinds).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..config.declare import Kind, declared, param
from .errors import DataError
from .tokenizers import Tokenizer

try:
    from tokenizers import Tokenizer as Backend
except ImportError:            # optional: pip install 'nanodecoder[hf]'
    Backend = None

HF_FILE, HF_CONFIG = "hf_tokenizer.json", "tokenizer_config.json"


def _backend(path: Path):
    if Backend is None:
        raise DataError("the hf tokenizer needs the 'tokenizers' package: pip install 'nanodecoder[hf]'")
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the library raises its own Exception subclass for any malformed file
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (BPE, WordPiece, Unigram...), encoded by the ``tokenizers`` library."""

    kind = "hf"

    @declared
    class Spec(Kind):
        path: str = param(doc="A Hugging Face tokenizer.json file (relative to the blueprint's folder).",
                          min_length=1)

    def __init__(self, backend, source: Path, eot_id: int | None = None):
        self.backend = backend
        self.source = Path(source)                       # the tokenizer.json it was read from
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = eot_id

    @classmethod
    def from_file(cls, path: str | Path, eot_id: int | None = None) -> "HFTokenizer":
        return cls(_backend(Path(path)), Path(path), eot_id)

    @classmethod
    def build(cls, spec, corpus) -> "HFTokenizer":
        return cls.from_file(spec.path)

    @classmethod
    def from_saved(cls, meta: dict[str, Any], directory: Path) -> "HFTokenizer":
        return cls.from_file(Path(directory) / HF_FILE, meta.get("eot_id"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode_special(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids     # added tokens are matched in the text

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise self._bad_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.source.resolve() != (directory / HF_FILE).resolve():
            shutil.copyfile(self.source, directory / HF_FILE)
            config = self.source.with_name(HF_CONFIG)
            if config.is_file():
                shutil.copyfile(config, directory / HF_CONFIG)
        self.source = directory / HF_FILE
        return super().save(directory)
