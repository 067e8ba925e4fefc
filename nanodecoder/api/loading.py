"""A trained run, loaded for use from Python.

    import nanodecoder
    model, tokenizer = nanodecoder.load("runs/dense_gpt/20250101-120000")          # best checkpoint, CPU
    run = nanodecoder.load(path, "step_000500", device="cuda", dtype="bfloat16")     # run.checkpoint, run.spec

The model is a :class:`~nanodecoder.model.decoder.Decoder` in eval mode: ``model(ids).logits`` is [B, T, V],
one row of logits per position (``logits_to_keep=1``: the last position only, what generation reads).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import load_tokenizer
from ..finetune.spec import ClassificationSpec
from ..hf.convert import DTYPES
from ..model import build_model
from ..model.decoder import Decoder
from ..train.rundir import RunDir
from .blueprint import RunSpec, load_blueprint, run_spec


@dataclass(frozen=True)
class LoadedRun:
    """A run's model (eval mode) and tokenizer, the checkpoint folder they were read from and the run's spec.

    Unpacks as ``model, tokenizer = nanodecoder.load(run_dir)``, the pair nearly every caller wants; the
    checkpoint and the spec are read by name, so a field added here later breaks nobody's unpacking."""
    model: Decoder
    tokenizer: Any
    checkpoint: Path
    spec: RunSpec

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def weights_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``, or the torch dtype) -> the torch
    dtype; None stays None (the model keeps float32)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not a weights dtype: use one of {', '.join(DTYPES)} (or the torch "
                     "dtype), or None for float32")


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters (tied ones once); buffers keep their dtype, so RoPE's inverse
    frequencies and MoE balancing biases stay float32 (``module.to(dtype)`` would round them too)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def load_run_model(run_dir: Path, which: str = "best", device: str = "cpu", *, lm_only: bool = False,
                   task: str = "sample from", dtype: str | torch.dtype | None = None):
    """(model, tokenizer, checkpoint path, run spec) of a run directory (the tuple form of :func:`load`, which
    the command-line modules use).

    ``lm_only``: refuse a classification run, which has no language-model head to ``task``."""
    cast = weights_dtype(dtype)
    run = RunDir.open(run_dir)
    bp = load_blueprint(run / RunDir.BLUEPRINT)
    tokenizer = load_tokenizer(run / RunDir.TOKENIZER)
    spec = run_spec(bp, tokenizer.vocab_size)
    if lm_only and isinstance(spec.finetune, ClassificationSpec):
        raise ValueError(f"{run_dir} is a classification fine-tuning run: a classification run has no "
                         f"language-model head to {task}; use its source run or an instruction-tuned run instead")
    # best: latest where no evaluation improved (or keep_best off); a run still training may prune or set aside
    # the checkpoint found here before it is read: the read then moves to the newest complete one
    path = run.checkpoints.for_reading(which)
    model = build_model(spec.model, device=device)  # real init: non-persistent buffers (RoPE's inverse frequencies) get filled
    path = run.checkpoints.read_weights(model, which, path)
    if cast is not None:
        cast_weights(model, cast)
    model.eval()
    return model, tokenizer, path, spec


def load(run_dir: str | Path, checkpoint: str = "best", *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> LoadedRun:
    """Load a trained (or imported, or instruction-tuned) run directory for use from Python.

    ``checkpoint``: ``best`` (``latest`` where the run has no best), ``latest`` or a folder name such as
    ``step_000500``.  ``device``: where the model is built and its weights read.  ``dtype``: ``float32``,
    ``bfloat16`` or ``float16`` (a string or the torch dtype) to cast the weights to; None keeps float32.
    A folder that is not a run, a missing checkpoint or a classification run raises an error that says so."""
    return LoadedRun(*load_run_model(Path(run_dir), checkpoint, device, lm_only=True, task="return logits from",
                                     dtype=dtype))
