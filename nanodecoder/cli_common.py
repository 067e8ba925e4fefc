"""Small helpers shared by the command-line entry points."""
from __future__ import annotations

import sys
from pathlib import Path

from .config import Blueprint, BlueprintError, Problem, load_blueprint


def fail(err: Exception, code: int = 2) -> int:
    """Print a user-facing error (no traceback) and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return code


def blueprint_vocab(bp: Blueprint) -> int | None:
    """The vocabulary size of the blueprint's tokenizer when it is known without the corpus."""
    data = bp.raw.get("data")
    if data is None:
        return None
    try:
        from .data import DataSpec, tokenizer_vocab_size
    except ImportError:
        return None
    return tokenizer_vocab_size(DataSpec.from_dict(data))


def blueprint_model_spec(path: str | Path, overrides: list[str] | None = None, vocab_size: int | None = None):
    """Load a blueprint and build its ModelSpec (vocab from the tokenizer when 'auto')."""
    from .model import build_model_spec
    bp = load_blueprint(path, overrides)
    if vocab_size is None and bp.raw["model"].get("vocab_size", "auto") == "auto":
        vocab_size = blueprint_vocab(bp)
        if vocab_size is None:
            file, line = bp.lines.get(("model",), (str(path), None))
            raise BlueprintError([Problem(file, "model.vocab_size", line,
                                          "vocab_size is 'auto' and the tokenizer's vocabulary is only known after "
                                          "the data is prepared (char tokenizer); set model.vocab_size or run "
                                          "python -m nanodecoder.run BLUEPRINT --dry-run, which prepares the data")])
    return bp, build_model_spec(bp.raw["model"], vocab_size)
