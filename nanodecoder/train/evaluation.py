"""Validation of a model over fixed batches of whole examples (the fine-tuning tasks' evaluations).

Each function is ``f(trainer, batches) -> metrics`` over an iterable of
``(x, y)`` batches that every rank walks in full (the same numbers on every
rank, so nothing is reduced); a task binds its validation batches with
``functools.partial`` and the Trainer calls the result as its ``evaluator``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


@torch.no_grad()
def token_loss(trainer, batches: Iterable) -> dict[str, Any]:
    """Mean cross-entropy per learned target token (targets >= 0), over all the batches."""
    model = trainer.model
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=trainer.runtime.device)
    count = 0
    try:
        for batch in batches:
            x, y = trainer._to_device(batch)
            n = int((y >= 0).sum())
            with trainer.runtime.autocast():
                total += model(x, y).ce_loss.double() * n
            count += n
    finally:
        model.train()
    return {"val_loss": total.item() / count, "val_bpb": None}


@torch.no_grad()
def label_accuracy(trainer, batches: Iterable) -> dict[str, Any]:
    """Mean cross-entropy and accuracy of a classifier's one label per row, over all the batches."""
    model = trainer.model
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    try:
        for batch in batches:
            x, y = trainer._to_device(batch)
            with trainer.runtime.autocast():
                out = model(x, y)
            loss_sum += out.ce_loss.item() * len(y)
            correct += int((out.logits.argmax(-1) == y).sum())
            n += len(y)
    finally:
        model.train()
    return {"val_loss": loss_sum / n, "val_acc": correct / n, "val_bpb": None}
