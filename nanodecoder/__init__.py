"""Nanodecoder: decoder-only transformers (dense and MoE) built from YAML blueprints.

    import nanodecoder
    model, tokenizer = nanodecoder.load("runs/dense_gpt/20250101-120000")   # a trained run, eval mode, CPU
    logits = model(ids).logits                                              # [B, T, V]: every position

The root package is the library's public face: :func:`load` and :class:`LoadedRun` (``nanodecoder/api/``).
"""
from .api import LoadedRun, load

__version__ = "0.1.0"
__all__ = ["LoadedRun", "__version__", "load"]
