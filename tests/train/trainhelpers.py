"""Helpers shared by the training-run tests (tests/train, tests/test_run_cli.py, tests/test_sample.py)."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

WORDS = ("the king shall speak of love and war to thee my lord ROMEO JULIET what light through yonder "
         "window breaks it is the east and sun arise fair kill envious moon").split()


def make_corpus(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(5, 12):
            lines.append(" ".join(line) + rng.choice([",", ".", "!", "?"]))
            line = []
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_raw(tmp: Path, moe: bool = False) -> dict:
    mlp = ({"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32, "capacity_factor": 1.0,
            "lb_loss_coef": 0.01} if moe else {"kind": "gelu"})
    return {
        "name": "tiny_moe" if moe else "tiny",
        "model": {"context_length": 16, "d_model": 32, "n_layers": 2, "dropout": 0.1,
                  "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": mlp}},
        "data": {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "byte"}},
        "train": {"steps": 8, "batch_size": 4, "lr": 0.01, "eval_every": 4, "eval_steps": 2, "log_every": 1,
                  "checkpoint_every": 4, "keep_checkpoints": 2, "seed": 1,
                  "schedule": {"kind": "cosine", "warmup_steps": 2}},
        "logging": {"runs_dir": str(tmp / "runs"), "progress": False},
        "sample": {"max_new_tokens": 8, "prompt": "the "},
        "runtime": {"profile": "cpu"},
    }


def write_blueprint(tmp: Path, raw: dict | None = None, name: str = "tiny.yaml", **sections) -> Path:
    raw = copy.deepcopy(raw or tiny_raw(tmp))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    if not (tmp / "corpus.txt").exists():
        make_corpus(tmp / "corpus.txt")
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/*/blueprint.yaml"))


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["NANODECODER_CACHE"] = str(tmp / "cache")
    env.pop("WANDB_API_KEY", None)
    return env


def private_env(tmp_root: Path) -> dict[str, str]:
    """Environment changes every training test makes: its own data cache, quiet W&B."""
    return {"NANODECODER_CACHE": str(tmp_root / "nanodecoder-cache"), "WANDB_SILENT": "true"}


def train_tiny(tmp: Path, argv_extra: list[str] | None = None, raw: dict | None = None) -> Path:
    """Train the tiny blueprint in-process; return its run directory."""
    from nanodecoder.cli.run import main
    bp = write_blueprint(tmp, raw)
    assert main([str(bp), *(argv_extra or [])]) == 0
    (run,) = run_dirs(tmp / "runs")
    return run


def make_trainer(tmp: Path, moe: bool = False, model_seed: int = 0, dropout: float = 0.1, **train):
    """A Trainer for the tiny model on the tiny corpus, built without the blueprint loader."""
    from nanodecoder.cli.catalog import catalog
    from nanodecoder.config.declare import build
    from nanodecoder.data import DataSpec, prepare_data
    from nanodecoder.model import build_model, build_model_spec
    from nanodecoder.runtime import RuntimeSpec, setup_runtime
    from nanodecoder.train.spec import TrainSpec
    from nanodecoder.train.trainer import Trainer, seed_everything
    raw = tiny_raw(tmp, moe=moe)
    if not (tmp / "corpus.txt").exists():
        make_corpus(tmp / "corpus.txt")
    prep = prepare_data(build(DataSpec, raw["data"], catalog()), base_dir=tmp, progress=False)
    raw["model"]["dropout"] = dropout
    mspec = build_model_spec(raw["model"], prep.tokenizer.vocab_size)
    runtime = setup_runtime(RuntimeSpec(profile="cpu"))
    spec = build(TrainSpec, {**raw["train"], **train}, catalog())
    seed_everything(spec.seed)
    model = build_model(mspec, seed=model_seed)
    return Trainer(model, spec, runtime, prep, context_length=mspec.context_length)


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline W&B run under ``run_dir``, read back from its ``.wandb`` file.

    The file is a LevelDB-style log (wandb's transaction log): a 7-byte header
    (``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte
    header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)
    holding a serialized ``wandb.proto.wandb_internal_pb2.Record``.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def fit_pattern(model, vocab: int, steps: int = 20, repeats: int = 40, seed: int = 0):
    """Train ``model`` for ``steps`` AdamW steps on one random 8-token pattern repeated; ``(losses, data)``."""
    import torch
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (8,), generator=g).repeat(repeats)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, data
