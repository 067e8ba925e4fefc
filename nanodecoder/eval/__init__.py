"""Evaluation: HellaSwag (completion-style, acc and acc_norm) and loss / bits per byte on any text.

    python -m nanodecoder.eval RUN_DIR --task hellaswag --data hellaswag_val.jsonl
    python -m nanodecoder.eval RUN_DIR --task text --data held_out.txt

The same evaluations run during training from a blueprint's ``eval:`` section
(:func:`build_periodic_evals`).
"""
from __future__ import annotations

from .hellaswag import NORMALIZATION, evaluate_hellaswag, load_items, score_items
from .periodic import PeriodicEval, build_periodic_evals
from .spec import EvalSpec, HellaSwagEvalSpec, TextEvalSpec
from .text import evaluate_text, evaluate_tokens, windows

__all__ = ["EvalSpec", "HellaSwagEvalSpec", "NORMALIZATION", "PeriodicEval", "TextEvalSpec", "build_periodic_evals",
           "evaluate_hellaswag", "evaluate_text", "evaluate_tokens", "load_items", "score_items", "windows"]
