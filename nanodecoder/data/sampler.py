"""Batches of (input, target) windows from a 1-D token array, for one rank of many.

Each global batch (``batch_size * world_size`` windows) is drawn from a
generator that depends only on ``seed`` and the batch's index; a rank takes
its own slice ``[rank * batch_size, (rank + 1) * batch_size)``.  So

* two ranks with ``batch_size = B`` see together exactly the global batch
  that one rank with ``batch_size = 2B`` sees, in the same order;
* the state is one counter: restoring it (also with another world size that
  keeps the global batch) continues with the identical batches.

Modes: ``random`` draws window starts uniformly (``x = tokens[i:i+T]``,
``y = tokens[i+1:i+T+1]``, like nanoGPT); ``sequential`` walks epochs over the
non-overlapping windows ``[k*T, k*T+T]`` in an order shuffled per epoch.
"""
from __future__ import annotations

import typing
from typing import Any, Iterator

import numpy as np
import torch

from .errors import DataError
from .spec import DataSpec

_MODES = typing.get_args(typing.get_type_hints(DataSpec)["sampling"])

STATE_VERSION = 1


class BatchSampler:
    """Seeded, resumable, rank-aware batches of shape ``[batch_size, context_length]`` (int64)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, mode: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if mode not in _MODES:
            raise DataError(f"sampling mode '{mode}' is not one of {', '.join(_MODES)}")
        if batch_size < 1 or context_length < 1:
            raise DataError(f"batch_size ({batch_size}) and context_length ({context_length}) must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} must be in [0, world_size={world_size})")
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if len(tokens) < context_length + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of context_length+1 = "
                            f"{context_length + 1}; use more data or a shorter context_length")
        self.tokens = tokens
        self.batch_size, self.context_length = batch_size, context_length
        self.mode, self.seed = mode, int(seed)
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.n_windows = (len(tokens) - 1) // context_length   # sequential windows per epoch
        self.batches = 0                                       # global batches drawn so far
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """Passes over the data so far: the epoch the next sequential window comes from."""
        return self.batches * self.global_batch // self.n_windows

    def global_starts(self, index: int) -> np.ndarray:
        """Token offsets of all windows of global batch ``index`` (every rank's)."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, index])
            return rng.integers(0, len(self.tokens) - self.context_length, size=self.global_batch)
        first = index * self.global_batch
        positions = np.arange(first, first + self.global_batch)
        epochs, offsets = np.divmod(positions, self.n_windows)
        windows = np.empty_like(positions)
        for e in np.unique(epochs):
            windows[epochs == e] = self._permutation(int(e))[offsets[epochs == e]]
        return windows * self.context_length

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            self._perm = (epoch, rng.permutation(self.n_windows))
        return self._perm[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.global_starts(self.batches)
        self.batches += 1
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        T = self.context_length
        rows = np.stack([np.asarray(self.tokens[s:s + T + 1]) for s in mine]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "mode": self.mode, "seed": self.seed,
                "global_batch": self.global_batch, "context_length": self.context_length,
                "n_tokens": len(self.tokens), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("version", "mode", "seed", "global_batch", "context_length", "n_tokens"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the batch sampler: its saved {key} is {state.get(key)!r}, "
                                f"this run has {mine[key]!r}; resume with the same data and batch settings")
        self.batches = int(state["batches"])
