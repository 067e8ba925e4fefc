"""BatchSampler: windows, seeds, ranks (data parallel), sequential epochs, exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanodecoder.data import BatchSampler, DataError

TOKENS = np.arange(1000, dtype=np.uint16)


def draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batches_are_shifted_int64_windows(mode):
    x, y = BatchSampler(TOKENS, 4, 16, mode=mode, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(16))      # contiguous windows of TOKENS (= their index)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_same_seed_same_batches_other_seed_other_batches(mode):
    a = draw(BatchSampler(TOKENS, 4, 8, mode=mode, seed=3), 3)
    b = draw(BatchSampler(TOKENS, 4, 8, mode=mode, seed=3), 3)
    c = draw(BatchSampler(TOKENS, 4, 8, mode=mode, seed=4), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_two_ranks_see_exactly_the_global_batch_of_one_rank(mode):
    """World size 2 with per-rank batch B == world size 1 with batch 2B, batch after batch."""
    single = BatchSampler(TOKENS, 6, 8, mode=mode, seed=7)
    ranks = [BatchSampler(TOKENS, 3, 8, mode=mode, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):                                   # sequential: crosses several epochs
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(parts[0][0], parts[1][0])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_from_state_continues_with_identical_batches(mode):
    sampler = BatchSampler(TOKENS, 4, 8, mode=mode, seed=11)
    draw(sampler, 5)
    state = sampler.state_dict()
    expected = draw(sampler, 5)
    resumed = BatchSampler(TOKENS, 4, 8, mode=mode, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, draw(resumed, 5)))
    # a resumed run on two ranks with the same global batch continues the same stream
    halves = [BatchSampler(TOKENS, 2, 8, mode=mode, seed=11, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([h.next_batch()[0] for h in halves]), expected[0][0])


def test_resume_with_other_settings_is_refused():
    state = BatchSampler(TOKENS, 4, 8, seed=1).state_dict()
    for other in (BatchSampler(TOKENS, 4, 8, seed=2), BatchSampler(TOKENS, 4, 16, seed=1),
                  BatchSampler(TOKENS, 8, 8, seed=1), BatchSampler(TOKENS[:500], 4, 8, seed=1),
                  BatchSampler(TOKENS, 4, 8, mode="sequential", seed=1)):
        with pytest.raises(DataError, match="cannot resume the batch sampler"):
            other.load_state_dict(state)


def test_sequential_epoch_visits_every_window_once_in_a_new_order_each_epoch():
    tokens = np.arange(8 * 12 + 1 + 5, dtype=np.uint32)        # 12 windows of 8, 5 spare tokens
    sampler = BatchSampler(tokens, 3, 8, mode="sequential", seed=0)
    assert sampler.n_windows == 12
    epochs = []
    for _ in range(3):
        starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(4)]).tolist()
        assert sorted(starts) == list(range(0, 96, 8))
        epochs.append(starts)
    assert sampler.epoch == 3 and len({tuple(e) for e in epochs}) == 3


def test_random_windows_reach_the_last_token():
    tokens = np.arange(10, dtype=np.uint16)
    sampler = BatchSampler(tokens, 64, 9, seed=0)
    assert torch.equal(sampler.next_batch()[1], torch.arange(1, 10).expand(64, 9))


def test_bad_arguments_are_clear():
    with pytest.raises(DataError, match="cannot fill one window"):
        BatchSampler(TOKENS[:8], 1, 8)
    with pytest.raises(DataError, match="rank 2 must be in"):
        BatchSampler(TOKENS, 1, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="sampling mode 'shuffle'"):
        BatchSampler(TOKENS, 1, 8, mode="shuffle")
