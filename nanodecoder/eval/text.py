"""Loss and bits per byte of a model on any text file (comparable across tokenizers).

The text is encoded whole.  When the tokenizer has an end-of-text token it is
put in front, so every token of the text is predicted; otherwise the first
token only serves as context and its bytes are left out of the byte count.
Windows of ``context_length`` tokens advance by ``stride`` tokens; each window
scores only the tokens no earlier window scored, so every token is scored once:
``stride == context_length`` (the default) gives non-overlapping chunks, a
smaller stride a sliding window in which each scored token sees more context
(a lower, slower estimate).

    bpb = (summed loss in nats) / (ln 2 * bytes)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataError
from ..data.errors import read_utf8
from ..model import unwrap


def read_text(path: str | Path) -> str:
    return read_utf8(path)


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, first_scored, end)`` input windows ``[start, end)`` over tokens 0..n-1.

    A window's inputs are tokens ``[start, end)``, its targets ``[start+1, end+1)``; targets from
    ``first_scored`` on are new.  Every token 1..n-1 is a scored target exactly once.
    """
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in 1..context_length ({context_length}), got {stride}")
    out, done, start = [], 1, 0
    while done < n_tokens:
        end = min(start + context_length, n_tokens - 1)
        out.append((start, done, end))
        done = end + 1
        start = max(start + stride, done - context_length)
    return out


def evaluate_text(model, tokenizer, text: str, *, stride: int | None = None, batch_size: int = 8,
                  device: torch.device | str = "cpu", name: str = "text") -> dict:
    """``{task, tokens, bytes, loss, bpb, perplexity, stride}`` of ``model`` on ``text``."""
    try:
        ids = list(tokenizer.encode(text))
    except (DataError, ValueError) as e:
        raise DataError(f"{name}: the {tokenizer.kind} tokenizer cannot encode it: {e}") from None
    return evaluate_tokens(model, tokenizer, ids, len(text.encode("utf-8")), stride=stride, batch_size=batch_size,
                           device=device, name=name)


@torch.no_grad()
def evaluate_tokens(model, tokenizer, ids, n_bytes: int | None, *, stride: int | None = None, batch_size: int = 8,
                    device: torch.device | str = "cpu", name: str = "text") -> dict:
    """:func:`evaluate_text` of text already encoded: ``ids`` (e.g. a prepared split's tokens) spelling
    ``n_bytes`` UTF-8 bytes (None when unknown, e.g. token shards: then ``bpb`` is None)."""
    decoder = unwrap(model)
    ctx = decoder.spec.context_length
    stride = stride or ctx
    data = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if tokenizer.eot_id is not None:
        data = torch.cat([torch.tensor([tokenizer.eot_id]), data])
    elif len(data) and n_bytes is not None:
        n_bytes -= len(tokenizer.decode([int(data[0])]).encode("utf-8"))
    if len(data) < 2 or (n_bytes is not None and n_bytes <= 0):
        raise DataError(f"{name}: too short to evaluate ({len(data)} tokens)")
    spans = windows(len(data), ctx, stride)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(spans), batch_size):
            group = spans[i:i + batch_size]
            width = max(end - start for start, _, end in group)
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.full((len(group), width), -1, dtype=torch.long)
            for r, (start, first, end) in enumerate(group):
                x[r, :end - start] = data[start:end]
                y[r, first - 1 - start:end - start] = data[first:end + 1]
            x, y = x.to(device), y.to(device)
            h, _, _ = decoder.hidden(x)
            where = (y >= 0).nonzero(as_tuple=True)
            logits = decoder.logits(h[where]).float()        # the head with its soft-cap, as training scores
            total += F.cross_entropy(logits, y[where], reduction="sum").item()
            count += len(where[0])
    finally:
        model.train(was_training)
    loss = total / count
    return {"task": "text", "tokens": count, "bytes": n_bytes, "loss": loss,
            "bpb": None if n_bytes is None else total / (math.log(2) * n_bytes),
            "perplexity": math.exp(min(loss, 700.0)), "stride": stride}
