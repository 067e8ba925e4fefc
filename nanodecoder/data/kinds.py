"""The built-in data kinds (one line each) and what needs them by name: saved tokenizers.

``register(catalog)`` adds the sources and tokenizers; :func:`load_tokenizer`
restores a saved tokenizer by the kind written in its ``tokenizer.json``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..config.registry import Catalog, RegistryError, make_catalog
from .bpe import BpeTokenizer, TiktokenTokenizer
from .builtin import BuiltinSource
from .chat import read_saved_chat
from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .shards import TokenShardsSource
from .sources import TextSource, UrlSource
from .stdlib import PythonStdlibSource
from .tokenizers import META_FILE, ByteTokenizer, CharTokenizer, Tokenizer


def register(catalog: Catalog) -> None:
    """Add the built-in data sources and tokenizers to ``catalog``."""
    catalog["data_source"].add("python_stdlib", PythonStdlibSource)
    catalog["data_source"].add("builtin", BuiltinSource)
    catalog["data_source"].add("text", TextSource)
    catalog["data_source"].add("url", UrlSource)
    catalog["data_source"].add("token_shards", TokenShardsSource)
    catalog["tokenizer"].add("byte", ByteTokenizer)
    catalog["tokenizer"].add("char", CharTokenizer)
    catalog["tokenizer"].add("bpe", BpeTokenizer)
    catalog["tokenizer"].add("tiktoken", TiktokenTokenizer)
    catalog["tokenizer"].add("hf", HFTokenizer)


@functools.lru_cache(maxsize=None)
def data_catalog() -> Catalog:
    """The data kinds (built-ins and plug-ins), for reading saved tokenizers outside a blueprint run."""
    return make_catalog(register)


def lookup(category: str, kind: str, catalog: Catalog | None = None):
    """The class registered as ``kind`` in ``category``; unknown names are a DataError."""
    try:
        return (catalog or data_catalog())[category].get(kind)
    except RegistryError as e:
        raise DataError(str(e)) from None


def load_tokenizer(directory: str | Path, catalog: Catalog | None = None, cls=None) -> Tokenizer:
    """Restore a tokenizer saved with ``save(directory)``; needs no data and no network.

    ``cls``: the tokenizer class when the caller knows it (else the saved kind is looked up)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no tokenizer in {directory} (missing {META_FILE})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); prepare the data again") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise DataError(f"{path}: not a tokenizer description; prepare the data again")
    try:
        cls = cls if cls is not None and meta["kind"] == cls.kind else lookup("tokenizer", meta["kind"], catalog)
        tok = cls.from_saved(meta, Path(directory))
    except KeyError as e:
        raise DataError(f"{path}: missing field {e}; prepare the data again") from None
    tok.chat = read_saved_chat(directory)
    return tok


def tokenizer_vocab_size(spec) -> int | None:
    """The vocabulary size if known without the corpus (byte, bpe, tiktoken), else None (char).

    ``spec`` is a ``DataSpec`` or a built tokenizer spec.  For ``bpe`` it is the
    configured size, an upper bound reached on any corpus of useful size.
    """
    tspec = getattr(spec, "tokenizer", spec)
    return tspec.impl.known_vocab_size(tspec)
