"""The ``eval:`` section, declared::

    eval:
      hellaswag: {data: data/hellaswag_val.jsonl, every: 500, limit: 1000}
      text: {data: held_out.txt, every: 500}

Both are optional; ``every: null`` (the default) evaluates whenever the
validation loss is evaluated (``train.eval_every`` and after the last step).
"""
from __future__ import annotations

from ..config.declare import declared, param

EVERY_DOC = ("Evaluate every this many steps and after the last step (0: only after the last step); null: whenever "
             "the validation loss is evaluated (train.eval_every).")


@declared
class HellaSwagEvalSpec:
    """Completion-style HellaSwag: each ending scored by its summed (acc) and per-token mean (acc_norm)
    log-likelihood given the context."""
    SCHEMA_NAME = "hellaswag_eval"
    data: str = param(doc="The HellaSwag validation JSONL (data/hellaswag_val.jsonl of github.com/rowanz/hellaswag); "
                          "relative paths start at the blueprint's folder.", min_length=1)
    every: int | None = param(None, doc=EVERY_DOC, minimum=0)
    limit: int | None = param(None, doc="Score only the first N items (null: all 10,042).", minimum=1)
    batch_size: int = param(8, doc="Items per forward pass (4 rows each).", minimum=1)


@declared
class TextEvalSpec:
    """Loss per token and bits per byte on a UTF-8 text file."""
    data: str = param(doc="The UTF-8 text file; relative paths start at the blueprint's folder.", min_length=1)
    every: int | None = param(None, doc=EVERY_DOC, minimum=0)
    stride: int | None = param(None, doc="Tokens between window starts; null: context_length (non-overlapping "
                                         "chunks); smaller: sliding windows with more context per scored token.",
                               minimum=1)
    batch_size: int = param(8, doc="Windows per forward pass.", minimum=1)


@declared
class EvalSpec:
    """Evaluations run during training, each on its own schedule."""
    hellaswag: HellaSwagEvalSpec | None = param(None, doc="HellaSwag accuracy (hellaswag_acc, hellaswag_acc_norm).")
    text: TextEvalSpec | None = param(None, doc="Loss and bits per byte on a fixed text file (text_loss, text_bpb), "
                                                "comparable across tokenizers.")
