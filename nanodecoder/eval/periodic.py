"""Evaluations run every N steps of a training run (the blueprint's ``eval:`` section).

``build_periodic_evals`` reads the data once, before training (a bad file stops
the run before step 1); the training loop asks each evaluation ``due(step)``
and writes what it returns as an ``eval`` row of ``metrics.jsonl`` (and W&B,
under ``val/``), e.g. ``{"hellaswag_acc": .., "hellaswag_acc_norm": ..}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data import DataError
from .hellaswag import NORMALIZATION, evaluate_hellaswag, load_items
from .spec import EvalSpec
from .text import evaluate_text, read_text
from ..config.loader import blueprint_path


class PeriodicEval:
    """One evaluation and its schedule; calling it with the trainer returns the metrics to log."""

    def __init__(self, name: str, every: int | None, fn: Callable[[object], dict], line: Callable[[dict], str]):
        self.name, self.every, self.fn, self.line = name, every, fn, line

    def due(self, step: int, train_spec, total: int | None = None) -> bool:
        """After ``step`` of ``total`` (default: ``train.steps``)?"""
        if self.every is None:
            return train_spec.is_eval_step(step, total)
        return step == (total or train_spec.steps) or (self.every > 0 and step % self.every == 0)

    def __call__(self, trainer) -> dict:
        return self.fn(trainer)


def build_periodic_evals(spec: EvalSpec | None, tokenizer, base_dir: Path) -> list[PeriodicEval]:
    """The evaluations the ``eval:`` section asks for (none when it is absent)."""
    out: list[PeriodicEval] = []
    if spec is None:
        return out
    if spec.hellaswag is not None:
        hs = spec.hellaswag
        hs_path = blueprint_path(hs.data, base_dir)
        items = load_items(hs_path, hs.limit)

        def hellaswag(trainer) -> dict:
            r = evaluate_hellaswag(trainer.raw_model, tokenizer, hs_path, batch_size=hs.batch_size,
                                   device=trainer.runtime.device, items=items)
            return {"hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"], "hellaswag_n": r["n"]}

        out.append(PeriodicEval("hellaswag", hs.every, hellaswag,
                                lambda r: f"HellaSwag acc {r['hellaswag_acc']:.4f}, acc_norm "
                                          f"{r['hellaswag_acc_norm']:.4f} ({NORMALIZATION}) on "
                                          f"{r['hellaswag_n']} items"))
    if spec.text is not None:
        ts = spec.text
        text_path = blueprint_path(ts.data, base_dir)
        text = read_text(text_path)
        try:
            tokenizer.encode(text)  # refuse, before training, a text the tokenizer cannot encode
        except (DataError, ValueError) as e:
            raise DataError(f"eval.text.data {text_path}: the {tokenizer.kind} tokenizer cannot encode it: "
                            f"{e}") from None

        def text_eval(trainer) -> dict:
            r = evaluate_text(trainer.raw_model, tokenizer, text, stride=ts.stride, batch_size=ts.batch_size,
                              device=trainer.runtime.device, name=str(text_path))
            return {"text_loss": r["loss"], "text_bpb": r["bpb"]}

        out.append(PeriodicEval("text", ts.every, text_eval,
                                lambda r: f"{text_path.name}: loss {r['text_loss']:.4f}, {r['text_bpb']:.4f} bpb"))
    return out
