"""Batches of whole examples ("units"), with the interface of :class:`~nanodecoder.data.BatchSampler`.

A *unit* is what becomes one row of a batch: one fine-tuning record, or several
records packed into one window.  Units are visited in epochs, each in its own
seeded order; global batch ``i`` is units ``[i*G, (i+1)*G)`` of that endless
stream (``G = batch_size * world_size``) and a rank takes its slice, so the
state is one counter and resuming continues with the identical batches (as for
pre-training).  A *collate* function turns a list of units into the ``(x, y)``
tensors; the two kinds of unit the fine-tuning tasks use have theirs here:

* :func:`masked_rows`: a unit is a list of ``(tokens, n_masked)`` segments,
  concatenated into one row whose targets are -1 on the first ``n_masked``
  tokens of each segment (an instruction's prompt), rows right-padded;
* :func:`labelled_rows`: a unit is ``(tokens, label)``; inputs right-padded
  with -1, one label per row.

:class:`InOrder` walks a list of units once, in order (validation).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataError

STATE_VERSION = 1
Collate = Callable[[list], tuple[torch.Tensor, torch.Tensor]]


class UnitBatches:
    def __init__(self, units: Sequence, collate: Collate, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, kind: str = "finetune"):
        if not units:
            raise DataError("no training examples left to batch")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, "
                            f"{world_size})")
        self.units, self.collate = units, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.kind = kind
        self.global_batch = batch_size * world_size
        self.batches = 0
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.batches * self.global_batch // len(self.units)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 2]).permutation(len(self.units)))
        return self._perm[1]

    def global_indices(self, index: int) -> list[int]:
        """Unit indices of global batch ``index`` (every rank's)."""
        first = index * self.global_batch
        out = []
        for pos in range(first, first + self.global_batch):
            epoch, offset = divmod(pos, len(self.units))
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.global_indices(self.batches)
        self.batches += 1
        mine = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.collate([self.units[i] for i in mine])

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": self.kind, "seed": self.seed, "global_batch": self.global_batch,
                "n_units": len(self.units), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("version", "kind", "seed", "global_batch", "n_units"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the fine-tuning batches: the saved {key} is {state.get(key)!r}, "
                                f"this run has {mine[key]!r}; resume with the same data and batch settings")
        self.batches = int(state["batches"])


class InOrder:
    """Every unit once, in order, ``batch_size`` at a time; iterable any number of times."""

    def __init__(self, units: Sequence, collate: Collate, batch_size: int):
        self.units, self.collate, self.batch_size = units, collate, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.units), self.batch_size):
            yield self.collate(self.units[i:i + self.batch_size])


def pad_rows(rows: list[tuple[list[int], list[int]]], x_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` rows right-padded to the longest: inputs with ``x_pad``, targets with -1."""
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), x_pad, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (xs, ys) in enumerate(rows):
        x[r, :len(xs)] = torch.tensor(xs, dtype=torch.long)
        y[r, :len(ys)] = torch.tensor(ys, dtype=torch.long)
    return x, y


def masked_rows(units: list[list[tuple[list[int], int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token rows of segments whose first ``n_masked`` tokens are not learned (target -1)."""
    rows = []
    for unit in units:
        ids: list[int] = []
        labels: list[int] = []
        for tokens, n_masked in unit:
            ids += tokens
            labels += [-1] * n_masked + tokens[n_masked:]
        rows.append((ids[:-1], labels[1:]))
    return pad_rows(rows)


def labelled_rows(units: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs right-padded with -1 (never a token id), one label per row."""
    width = max(len(ids) for ids, _ in units)
    x = torch.full((len(units), width), -1, dtype=torch.long)
    for r, (ids, _) in enumerate(units):
        x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return x, torch.tensor([label for _, label in units], dtype=torch.long)
