"""The unigram baseline equals a direct computation."""
import math
from types import SimpleNamespace

import numpy as np

from nanodecoder.data import unigram_loss


def test_unigram_loss_matches_direct_computation():
    train = np.array([0, 0, 1, 2, 2, 2], dtype=np.uint16)
    val = np.array([0, 2, 3], dtype=np.uint16)
    prep = SimpleNamespace(train=train, val=val, tokenizer=SimpleNamespace(vocab_size=4))
    counts = {0: 3, 1: 2, 2: 4, 3: 1}          # add-one smoothed
    want = -sum(math.log(counts[t] / 10) for t in (0, 2, 3)) / 3
    assert abs(unigram_loss(prep) - want) < 1e-12
