"""Helpers of the evaluation and fine-tuning tests: run directories made without training."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HELLASWAG = HERE / "hellaswag_tiny.jsonl"     # six hand-written items in the HellaSwag validation format


def lm_raw(tmp: Path, *, context_length: int = 48, d_model: int = 32, n_layers: int = 2, name: str = "src") -> dict:
    """A tiny byte-level model blueprint (its data section names a corpus that is never read here)."""
    return {
        "name": name,
        "model": {"context_length": context_length, "d_model": d_model, "n_layers": n_layers, "dropout": 0.0,
                  "positional": {"kind": "rope"},
                  "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 2},
                            "mlp": {"kind": "gelu"}}},
        "data": {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "byte"}},
        "train": {"steps": 1, "batch_size": 4, "seed": 1},
        "logging": {"runs_dir": str(tmp / "runs"), "progress": False, "plots": False},
        "sample": {"enabled": False},
        "runtime": {"profile": "cpu"},
    }


def make_run_dir(tmp: Path, raw: dict | None = None, tokenizer=None, seed: int = 0) -> Path:
    """A run directory as ``python -m nanodecoder.run`` leaves it (blueprint, tokenizer, one checkpoint),
    holding a freshly initialised model: what evaluation and fine-tuning read, without the training."""
    from nanodecoder.data import ByteTokenizer
    from nanodecoder.model import build_model, build_model_spec
    from nanodecoder.train.rundir import RunDir
    raw = copy.deepcopy(raw or lm_raw(tmp))
    tokenizer = tokenizer or ByteTokenizer()
    run = RunDir.create(raw["logging"]["runs_dir"], raw["name"], yaml.safe_dump(raw, sort_keys=False), {})
    tokenizer.save(run / RunDir.TOKENIZER)
    model = build_model(build_model_spec(raw["model"], tokenizer.vocab_size), seed=seed)
    run.checkpoints.save(1, model, {"step": 1})
    return run.path


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
