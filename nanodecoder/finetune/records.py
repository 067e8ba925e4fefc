"""Reading fine-tuning data files, with a clear message naming the record for every mistake.

Instruction data (Alpaca format): a JSON list of objects, or JSONL (one object
per line), each with ``instruction`` (text), ``output`` (text) and optionally
``input`` (text; empty or missing means none).

Classification data: CSV with a header row, JSONL, or a JSON list; each record
has a text field and an integer label in ``0..n_classes-1`` (field names
configurable; CSV labels are written as digits).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..data import DataError
from ..eval.text import read_text as _read


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str


def json_records(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of a JSON list file or a JSONL file; ``where`` is "record N" (+ line for JSONL)."""
    text = _read(path)
    if path.suffix.lower() == ".jsonl":
        n = 0
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            n += 1
            try:
                yield f"record {n} (line {line_no})", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: record {n} (line {line_no}): not valid JSON ({e.msg} at column "
                                f"{e.colno})") from None
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"expected a JSON list of {what}, or a .jsonl file with one per line") from None
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of {what} ([{{...}}, {{...}}]), got a JSON "
                        f"{type(doc).__name__.replace('dict', 'object')}")
    for i, rec in enumerate(doc, start=1):
        yield f"record {i}", rec


def load_instructions(path: str | Path) -> list[Instruction]:
    path = Path(path)
    out = []
    for where, rec in json_records(path, "instruction records"):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {where}: expected an object with instruction, input, output; "
                            f"got {type(rec).__name__}")
        for key in ("instruction", "output"):
            if key not in rec:
                raise DataError(f"{path}: {where}: missing field '{key}' (an instruction record has "
                                "instruction, input (optional) and output)")
        for key in ("instruction", "input", "output"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise DataError(f"{path}: {where}: '{key}' must be text, got {type(rec[key]).__name__}")
        if not rec["instruction"].strip():
            raise DataError(f"{path}: {where}: 'instruction' is empty")
        out.append(Instruction(rec["instruction"], rec.get("input") or "", rec["output"] or ""))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _label(value: Any, n_classes: int, path: Path, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{path}: {where}: label {value!r} is not an integer class index in 0..{n_classes - 1}")
    if not 0 <= value < n_classes:
        raise DataError(f"{path}: {where}: label {value} is outside 0..{n_classes - 1} (n_classes is {n_classes})")
    return value


def _csv_records(path: Path, text_field: str, label_field: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))
    header = reader.fieldnames or []
    for key in (text_field, label_field):
        if key not in header:
            raise DataError(f"{path}: the CSV header has no '{key}' column (columns: {', '.join(header) or 'none'})")
    for i, row in enumerate(reader, start=1):
        yield f"record {i} (line {reader.line_num})", row


def load_examples(path: str | Path, n_classes: int, text_field: str = "text",
                  label_field: str = "label") -> list[tuple[str, int]]:
    """``(text, label)`` pairs of a CSV, JSONL or JSON-list file."""
    path = Path(path)
    records = _csv_records(path, text_field, label_field) if path.suffix.lower() == ".csv" \
        else json_records(path, "examples")
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {where}: expected an object with '{text_field}' and '{label_field}'")
        for key in (text_field, label_field):
            if rec.get(key) is None:
                raise DataError(f"{path}: {where}: missing field '{key}'")
        text = rec[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: {where}: '{text_field}' must be non-empty text")
        out.append((text, _label(rec[label_field], n_classes, path, where)))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def split_off(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, validation): a fixed, seeded ``fraction`` of the items (at least one) held out."""
    if len(items) < 2:
        raise DataError(f"cannot hold out a validation split from {len(items)} record(s); add records or "
                        "give val_data")
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = np.random.default_rng(seed).permutation(len(items))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
