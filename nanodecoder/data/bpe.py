"""Tokenizers built on ``tiktoken.Encoding``: ``bpe`` (trained here with
rustbpe) and ``tiktoken`` (a named encoding such as ``gpt2``).

Both save ``ranks.tiktoken`` in tiktoken's format, one ``base64(token bytes)
rank`` per line, beside ``tokenizer.json`` (split pattern, special tokens), so
either loads offline.  The ``tiktoken.Encoding`` fields ``_pat_str``,
``_mergeable_ranks`` and ``_special_tokens`` are read to save one; tiktoken
itself uses them to pickle an encoding.
"""
from __future__ import annotations

import base64
import binascii
import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

import rustbpe
import tiktoken

from ..config.declare import Kind, declared, param
from ..config.registry import suggest
from .errors import DataError
from .hf_bpe import HF_TOKENIZER_FILE, MERGES_FILE, VOCAB_FILE, gpt2_from_files
from .sources import Corpus
from .tokenizers import META_FILE, Tokenizer

RANKS_FILE = "ranks.tiktoken"
EOT_TEXT = "<|endoftext|>"


class RanksTokenizer(Tokenizer):
    """A ``tiktoken.Encoding`` (byte-level BPE ranks + split pattern + special tokens)."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding._special_tokens.get(EOT_TEXT)

    @classmethod
    def from_saved(cls, meta, directory) -> "RanksTokenizer":

        ranks = read_ranks(Path(directory) / RANKS_FILE)
        enc = tiktoken.Encoding(meta.get("name") or cls.kind, pat_str=meta["pattern"],
                                mergeable_ranks=ranks, special_tokens=meta["special_tokens"])
        tok = cls(enc)
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{directory}: tokenizer has {tok.vocab_size} tokens, {META_FILE} says "
                            f"{meta['vocab_size']}; the folder is damaged, prepare the data again")
        return tok

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        out = self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def special_tokens(self) -> dict[str, int]:
        return dict(self.encoding._special_tokens)

    def encode_special(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except (KeyError, ValueError, OverflowError):
            raise self._bad_ids(ids) from None

    def meta(self) -> dict[str, Any]:
        return {"pattern": self.encoding._pat_str, "special_tokens": dict(self.encoding._special_tokens)}

    def save(self, directory: str | Path) -> Path:
        directory = super().save(directory)
        write_ranks(directory / RANKS_FILE, self.encoding._mergeable_ranks)
        return directory


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (base64.b64encode(tok).decode("ascii") + f" {rank}\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("".join(lines), encoding="ascii")


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
        for line in lines:
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError, binascii.Error) as e:
        raise DataError(f"{path}: unreadable tokenizer ranks ({e}); prepare the data again") from None
    return ranks


class BpeTokenizer(RanksTokenizer):
    """Byte-level BPE (GPT-4 split pattern) trained with rustbpe on the train split; its last id is <|endoftext|>.

    ``vocab_size`` counts the end-of-text token (the last id).  A corpus too
    small to learn that many merges gives a smaller vocabulary, never a larger.
    """

    kind = "bpe"

    @declared
    class Spec(Kind):
        vocab_size: int = param(4096, doc="Number of token ids including <|endoftext|>; a corpus too small to "
                                          "learn that many merges gives fewer.", minimum=257, maximum=2 ** 20)

    @classmethod
    def known_vocab_size(cls, spec) -> int:
        return spec.vocab_size

    @classmethod
    def cache_salt(cls, spec) -> dict[str, Any]:
        try:
            return {"rustbpe": version("rustbpe")}
        except PackageNotFoundError:
            return {}

    @classmethod
    def build(cls, spec, corpus: Corpus) -> "BpeTokenizer":

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(corpus.train), spec.vocab_size - 1)
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        enc = tiktoken.Encoding("bpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks,
                                special_tokens={EOT_TEXT: len(ranks)})
        return cls(enc)


class TiktokenTokenizer(RanksTokenizer):
    """A named tiktoken encoding; needs tiktoken's cached file (fetched once online, or TIKTOKEN_CACHE_DIR pointing at
    a copy), or for ``gpt2`` a GPT-2 Hugging Face folder (``files:``, its vocab.json + merges.txt; see ``hf_bpe.py``).

    Its ranks are copied into the saved folder, so a run loads offline.
    """

    kind = "tiktoken"

    @declared
    class Spec(Kind):
        name: str = param(doc="The encoding's name: gpt2, r50k_base, p50k_base, cl100k_base, o200k_base, ...",
                          min_length=1)
        files: str | None = param(None, doc="For gpt2 only: a folder with GPT-2's Hugging Face vocab.json and "
                                            "merges.txt (e.g. a download of openai-community/gpt2); the encoding is "
                                            "built from them, offline, instead of from tiktoken's cache. Relative "
                                            "paths start at the blueprint's folder.", min_length=1)

        def check(self):
            if self.files is not None and self.name != "gpt2":
                yield ("files",), (f"only the gpt2 encoding is built from vocab.json/merges.txt, not "
                                   f"'{self.name}'; remove files to use tiktoken's cache")

    @classmethod
    def known_vocab_size(cls, spec) -> int:
        return cls._encoding(spec).n_vocab

    @classmethod
    def build(cls, spec, corpus: Corpus) -> "TiktokenTokenizer":
        return cls(cls._encoding(spec))

    @classmethod
    def _encoding(cls, spec):
        if spec.files is None:
            return get_named_encoding(spec.name)
        folder = Path(spec.files).resolve()
        stamp = tuple((folder / f).stat().st_mtime_ns if (folder / f).is_file() else None
                      for f in (VOCAB_FILE, MERGES_FILE, HF_TOKENIZER_FILE))
        return _gpt2_from_files(str(folder), stamp)

    def meta(self) -> dict[str, Any]:
        return {"name": self.encoding.name, **super().meta()}


@functools.lru_cache(maxsize=4)
def _gpt2_from_files(folder: str, stamp: tuple):
    """``gpt2_from_files``, read once per folder and file modification times (``stamp``)."""
    try:
        return gpt2_from_files(folder)
    except DataError as e:
        raise DataError(f"data.tokenizer.files: {e}") from None


def get_named_encoding(name: str):
    """``tiktoken.get_encoding(name)`` with one-line errors for unknown or unreachable encodings."""
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise DataError(f"data.tokenizer.name: unknown tiktoken encoding '{name}'{suggest(name, known)} "
                        f"(available: {', '.join(known)})")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken fetches with requests; any failure here means "not cached"
        where = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "its default cache"
        raise DataError(
            f"tiktoken encoding '{name}' is not in tiktoken's cache ({where}) and could not be fetched "
            f"({type(e).__name__}); run once with internet access to cache it, or set TIKTOKEN_CACHE_DIR "
            "to a folder holding the cached file copied from a machine that has it"
            + ("; or set data.tokenizer.files to a folder with GPT-2's Hugging Face vocab.json and merges.txt"
               if name == "gpt2" else "")) from None
