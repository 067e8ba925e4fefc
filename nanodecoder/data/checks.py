"""Numbers and guard rails: bits per byte, unigram baseline, model fit; the source's and tokenizer's checks before
the data is prepared."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import DataError
from .prepare import SPLITS, Prepared, cache_root
from .sources import Corpus
from .spec import DataSpec
from .tokenizers import Tokenizer


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean loss in nats per token into bits per byte of text.

    ``n_tokens`` and ``n_bytes`` describe the same text (e.g. a split's
    ``manifest["n_tokens"]["val"]`` and ``manifest["n_bytes"]["val"]``):
    ``bpb = loss_nats * n_tokens / (n_bytes * ln 2)``, comparable across tokenizers.
    """
    if n_bytes <= 0 or n_tokens < 0:
        raise ValueError(f"bits_per_byte needs n_bytes > 0 and n_tokens >= 0 (got {n_bytes}, {n_tokens})")
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise DataError unless the model's ``vocab_size`` covers the tokenizer's vocabulary."""
    tok_vocab = tokenizer.vocab_size
    if tok_vocab > vocab_size:
        raise DataError(f"the {tokenizer.kind} tokenizer has {tok_vocab} tokens but the model's "
                        f"vocab_size is {vocab_size}; set the model's vocab_size to at least {tok_vocab}")


def check_fits(prepared: Prepared, context_length: int, vocab_size: int) -> None:
    """Raise DataError unless every split fills a window and the model covers the vocabulary."""
    check_vocab(prepared.tokenizer, vocab_size)
    for split in SPLITS:
        n = len(prepared.split(split))
        if n < context_length + 1:
            raise DataError(f"the {split} split has {n} tokens, fewer than context_length + 1 = "
                            f"{context_length + 1}; use more data (data.source max_bytes or val_fraction) "
                            "or a shorter context_length")


def check_source(spec: DataSpec, base_dir: str | Path = ".") -> None:
    """Raise DataError for what is wrong with the data source that shows without reading its text (a missing
    or unreadable file, a device or an empty folder given as the corpus); offline."""
    spec.source.build(base_dir=Path(base_dir), cache_root=cache_root()).check()


def tokenizer_before_data(spec: DataSpec) -> Tokenizer | None:
    """The data section's tokenizer when it is known without the corpus (``byte``), else None (``char`` and
    ``bpe`` learn from the corpus; the others are checked once the data is prepared)."""
    cls = spec.tokenizer.impl
    return None if cls.needs_corpus else cls.build(spec.tokenizer, Corpus((), (), {}))


#: Tokens of a split counted for the unigram baseline; a larger split is sampled (see :func:`token_counts`).
UNIGRAM_TOKENS = 1 << 25
_CHUNK = 1 << 20


def token_counts(tokens, minlength: int, limit: int = UNIGRAM_TOKENS) -> np.ndarray:
    """How often each id occurs in ``tokens`` (a 1-D array or anything sliceable like one), read in chunks;
    beyond ``limit`` tokens, ``limit // 2**20`` evenly spaced chunks of 2**20 tokens are counted instead."""
    n = len(tokens)
    if n <= limit:
        starts = range(0, n, _CHUNK)
    else:
        k = max(1, limit // _CHUNK)
        starts = np.linspace(0, n - _CHUNK, k).astype(np.int64).tolist()
    counts = np.zeros(minlength, dtype=np.int64)
    for s in starts:
        c = np.bincount(np.asarray(tokens[s:s + _CHUNK]), minlength=minlength)
        if len(c) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(c) - len(counts), dtype=np.int64)])
        counts[:len(c)] += c
    return counts


def unigram_loss(prepared: Prepared) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's
    unigram distribution (add-one smoothed): the loss of a model that ignores context.
    A trained model's validation loss should end well below it.  Splits beyond
    ``UNIGRAM_TOKENS`` (token shards) are sampled, so the figure is an estimate there."""
    vocab = prepared.tokenizer.vocab_size
    train = token_counts(prepared.train, vocab).astype(np.float64)
    val = token_counts(prepared.val, vocab).astype(np.float64)
    size = max(len(train), len(val))
    train = np.pad(train, (0, size - len(train))) + 1.0
    logp = np.log(train / train.sum())
    val = np.pad(val, (0, size - len(val)))
    return float(-(val * logp).sum() / max(val.sum(), 1.0))
