"""HellaSwag, scored completion-style (as the public GPT-2 reproductions do).

Data: the public validation split, ``data/hellaswag_val.jsonl`` of the
``rowanz/hellaswag`` GitHub repository (10,042 items, one JSON object per line
with ``ctx``, ``endings`` (4 strings), ``label`` (0-3), ``activity_label``,
``ind``, ...).  The user supplies it by path; nothing is downloaded.

Scoring, per item: the context is encoded once, each ending as ``" " + ending``
(the space that separates it from the context); the model scores
``context + ending`` and the log-likelihood of the *ending tokens* given what
precedes them is summed.

* ``acc``: the ending with the largest summed log-likelihood is the prediction;
* ``acc_norm``: the ending with the largest *mean log-likelihood per ending
  token* (``NORMALIZATION = "per_token_mean"``, as in Karpathy's llm.c /
  build-nanoGPT HellaSwag script; lm-eval-harness divides by the ending's
  characters instead, so its acc_norm differs slightly).

A sequence longer than ``context_length + 1`` tokens is left-truncated (the
oldest context tokens go; if an ending alone does not fit, only its last tokens
are scored).  Items are scored in batches: the rows (4 per item) are
right-padded, which a causal model never sees, and only the ending positions
go through the output head.  An item the tokenizer cannot encode (a ``char``
vocabulary without some character) is skipped and counted.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from ..data import DataError
from ..data.errors import read_utf8
from ..model import unwrap

NORMALIZATION = "per_token_mean"
SOURCE = "https://github.com/rowanz/hellaswag (data/hellaswag_val.jsonl)"
HEAD_CHUNK = 2048          # ending positions sent through the output head at once (bounds memory)


@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple[str, ...]
    label: int
    line: int               # 1-based line of the JSONL file (for messages)


def _bad(path: Path, line: int, record: int, what: str) -> DataError:
    return DataError(f"{path}: record {record} (line {line}): {what}")


def load_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all when None) of a HellaSwag JSONL file; a bad line is a DataError."""
    path = Path(path)
    text = read_utf8(path, f"no such file; HellaSwag data comes from {SOURCE}")
    items: list[Item] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(items) >= limit:
            break
        rec_no = len(items) + 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(path, line_no, rec_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise _bad(path, line_no, rec_no, f"expected a JSON object, got {type(rec).__name__}")
        for key in ("ctx", "endings", "label"):
            if key not in rec:
                raise _bad(path, line_no, rec_no, f"missing field '{key}' (a HellaSwag record has ctx, endings, "
                                                  "label)")
        ctx, endings, label = rec["ctx"], rec["endings"], rec["label"]
        if not isinstance(ctx, str):
            raise _bad(path, line_no, rec_no, "'ctx' must be a string")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise _bad(path, line_no, rec_no, "'endings' must be a list of at least 2 non-empty strings")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise _bad(path, line_no, rec_no, f"'label' must be an integer in 0..{len(endings) - 1}, "
                                              f"got {rec['label']!r}")
        items.append(Item(ctx, tuple(endings), label, line_no))
    if not items:
        raise DataError(f"{path}: no HellaSwag records found")
    return items


@dataclass
class Scored:
    """One item's result: per-ending summed log-likelihood and ending-token counts."""
    sum_logprob: list[float]
    n_tokens: list[int]
    label: int

    @property
    def pred(self) -> int:
        return max(range(len(self.sum_logprob)), key=lambda i: (self.sum_logprob[i], -i))

    @property
    def pred_norm(self) -> int:
        means = [s / n for s, n in zip(self.sum_logprob, self.n_tokens)]
        return max(range(len(means)), key=lambda i: (means[i], -i))


def encode_item(tokenizer, item: Item, context_length: int) -> list[tuple[list[int], int]] | None:
    """Per ending: (tokens of context + ending, cut to context_length + 1, number of ending tokens scored).

    None when the tokenizer cannot encode the item or the context is empty and there is no
    end-of-text token to start from.
    """
    try:
        ctx = list(tokenizer.encode(item.ctx))
        ends = [list(tokenizer.encode(" " + e)) for e in item.endings]
    except (DataError, ValueError):
        return None
    if not ctx:
        if tokenizer.eot_id is None:
            return None
        ctx = [tokenizer.eot_id]
    rows = []
    for end in ends:
        seq = (ctx + end)[-(context_length + 1):]
        rows.append((seq, min(len(end), len(seq) - 1)))
    return rows


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], int]], device) -> tuple[list[float], list[int]]:
    """Summed log-likelihood of the last ``n`` tokens of each row (given the tokens before), batched."""
    model = unwrap(model)
    width = max(len(seq) for seq, _ in rows) - 1
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (seq, n) in enumerate(rows):
        t = torch.tensor(seq, dtype=torch.long)
        x[r, :len(seq) - 1] = t[:-1]
        y[r, len(seq) - 1 - n:len(seq) - 1] = t[len(seq) - n:]
    x, y = x.to(device), y.to(device)
    h, _, _ = model.hidden(x)
    where = (y >= 0).nonzero(as_tuple=True)
    hs, ts = h[where], y[where]
    logp = torch.empty(len(ts), dtype=torch.float32, device=device)
    for i in range(0, len(ts), HEAD_CHUNK):
        logits = model.logits(hs[i:i + HEAD_CHUNK]).float()      # the head with its soft-cap
        logp[i:i + HEAD_CHUNK] = -F.cross_entropy(logits, ts[i:i + HEAD_CHUNK], reduction="none")
    sums = torch.zeros(len(rows), dtype=torch.float32, device=device).index_add_(0, where[0], logp)
    return sums.tolist(), [n for _, n in rows]


def score_items(model, tokenizer, items: Iterable[Item], *, batch_size: int = 8,
                device: torch.device | str = "cpu") -> tuple[list[Scored], int]:
    """(scored items, number skipped because the tokenizer cannot encode them)."""
    ctx_len = unwrap(model).spec.context_length
    was_training = model.training
    model.eval()
    scored: list[Scored] = []
    skipped = 0
    pending: list[tuple[Item, list]] = []

    def flush():
        rows = [row for _, item_rows in pending for row in item_rows]
        sums, counts = score_rows(model, rows, device)
        k = 0
        for item, item_rows in pending:
            n = len(item_rows)
            scored.append(Scored(sums[k:k + n], counts[k:k + n], item.label))
            k += n
        pending.clear()

    try:
        for item in items:
            rows = encode_item(tokenizer, item, ctx_len)
            if rows is None:
                skipped += 1
                continue
            pending.append((item, rows))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    finally:
        model.train(was_training)
    return scored, skipped


def summarize(scored: list[Scored], skipped: int = 0) -> dict:
    n = len(scored)
    acc = sum(s.pred == s.label for s in scored) / n if n else math.nan
    acc_norm = sum(s.pred_norm == s.label for s in scored) / n if n else math.nan
    return {"task": "hellaswag", "n": n, "skipped": skipped, "acc": acc, "acc_norm": acc_norm,
            "acc_norm_normalization": NORMALIZATION}


def evaluate_hellaswag(model, tokenizer, path: str | Path, *, limit: int | None = None, batch_size: int = 8,
                       device: torch.device | str = "cpu", items: list[Item] | None = None) -> dict:
    """``{task, n, skipped, acc, acc_norm, acc_norm_normalization}`` on the first ``limit`` items."""
    items = items if items is not None else load_items(path, limit)
    scored, skipped = score_items(model, tokenizer, items, batch_size=batch_size, device=device)
    if not scored:
        raise DataError(f"{path}: the {tokenizer.kind} tokenizer could not encode any of the {len(items)} items")
    return summarize(scored, skipped)
