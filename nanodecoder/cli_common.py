"""Small helpers shared by the command-line entry points."""
from __future__ import annotations

import sys
from pathlib import Path

from .config import Blueprint, BlueprintError, Problem, load_blueprint


def fail(err: Exception, code: int = 2) -> int:
    """Print a user-facing error (no traceback) and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return code


def blueprint_vocab(bp: Blueprint, prepare: bool = True) -> int | None:
    """The vocabulary size of the blueprint's tokenizer.

    Known without the corpus for byte, bpe and tiktoken; a char vocabulary
    needs the corpus, which is prepared (and cached) when ``prepare`` is true.
    """
    from .data import DataSpec, prepare_data, tokenizer_vocab_size
    data = bp.raw.get("data")
    if data is None:
        return None
    spec = DataSpec.from_dict(data)
    vocab = tokenizer_vocab_size(spec)
    if vocab is None and prepare:
        vocab = prepare_data(spec, base_dir=bp.path.parent).tokenizer.vocab_size
    return vocab


def blueprint_model_spec(path: str | Path, overrides: list[str] | None = None, vocab_size: int | None = None):
    """Load a blueprint and build its ModelSpec (vocab from the tokenizer when 'auto')."""
    from .model import build_model_spec
    bp = load_blueprint(path, overrides)
    if vocab_size is None and bp.raw["model"].get("vocab_size", "auto") == "auto":
        vocab_size = blueprint_vocab(bp)
        if vocab_size is None:  # no data section to take it from
            file, line = bp.lines.get(("model",), (str(path), None))
            raise BlueprintError([Problem(file, "model.vocab_size", line,
                                          "vocab_size is 'auto' but the blueprint has no data section to take "
                                          "the tokenizer from; set model.vocab_size or add a data section")])
    return bp, build_model_spec(bp.raw["model"], vocab_size)
