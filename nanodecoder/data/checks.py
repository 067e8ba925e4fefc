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


def unigram_loss(prepared: Prepared) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's
    unigram distribution (add-one smoothed): the loss of a model that ignores context.
    A trained model's validation loss should end well below it."""
    vocab = prepared.tokenizer.vocab_size
    counts = np.bincount(np.asarray(prepared.train), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.bincount(np.asarray(prepared.val), minlength=vocab).astype(np.float64)
    return float(-(val * logp[: len(val)]).sum() / max(val.sum(), 1.0))
