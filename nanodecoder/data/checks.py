"""Numbers and guard rails that use prepared data: bits per byte, unigram baseline, model fit."""
from __future__ import annotations

import math

import numpy as np

from .errors import DataError
from .prepare import SPLITS, Prepared


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean loss in nats per token into bits per byte of text.

    ``n_tokens`` and ``n_bytes`` describe the same text (e.g. a split's
    ``manifest["n_tokens"]["val"]`` and ``manifest["n_bytes"]["val"]``):
    ``bpb = loss_nats * n_tokens / (n_bytes * ln 2)``, comparable across tokenizers.
    """
    if n_bytes <= 0 or n_tokens < 0:
        raise ValueError(f"bits_per_byte needs n_bytes > 0 and n_tokens >= 0 (got {n_bytes}, {n_tokens})")
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def check_fits(prepared: Prepared, context_length: int, vocab_size: int) -> None:
    """Raise DataError unless every split fills a window and the model covers the vocabulary."""
    tok_vocab = prepared.tokenizer.vocab_size
    if tok_vocab > vocab_size:
        raise DataError(f"the {prepared.tokenizer.kind} tokenizer has {tok_vocab} tokens but the model's "
                        f"vocab_size is {vocab_size}; set the model's vocab_size to at least {tok_vocab}")
    for split in SPLITS:
        n = len(prepared.split(split))
        if n < context_length + 1:
            raise DataError(f"the {split} split has {n} tokens, fewer than context_length + 1 = "
                            f"{context_length + 1}; use more data (data.source max_bytes or val_fraction) "
                            "or a shorter context_length")


def unigram_loss(prepared: Prepared) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's
    unigram distribution (add-one smoothed): the loss of a model that ignores context.
    A trained model's validation loss should end well below it."""
    vocab = prepared.tokenizer.vocab_size
    counts = np.bincount(np.asarray(prepared.train), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.bincount(np.asarray(prepared.val), minlength=vocab).astype(np.float64)
    return float(-(val * logp[: len(val)]).sum() / max(val.sum(), 1.0))
