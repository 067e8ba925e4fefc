"""The run directory ``<runs_dir>/<blueprint name>/<timestamp>/`` and what lives in it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointManager, write_atomic_text


class RunDirError(Exception):
    """A folder given as a run directory is not one."""


class RunDir:
    BLUEPRINT, META, METRICS, SAMPLES = "blueprint.yaml", "run.json", "metrics.jsonl", "samples.txt"
    LOSS_PLOT, LOAD_PLOT, TOKENIZER, CKPT = "loss.png", "expert_load.png", "tokenizer", "ckpt"

    def __init__(self, path: Path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.checkpoints = CheckpointManager(self.path / self.CKPT, keep=keep_checkpoints)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, runs_dir: str | Path, name: str, blueprint_yaml: str, meta: dict[str, Any],
               keep_checkpoints: int = 2) -> "RunDir":
        """A new, empty run folder named by the current time (``-2``, ``-3``... if taken)."""
        parent = Path(runs_dir) / name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = parent / stamp, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                path = parent / f"{stamp}-{n}"
        run = cls(path, keep_checkpoints)
        (path / cls.BLUEPRINT).write_text(blueprint_yaml)
        run.write_meta({"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta})
        return run

    @classmethod
    def open(cls, path: str | Path, keep_checkpoints: int = 2) -> "RunDir":
        path = Path(path)
        if not (path / cls.BLUEPRINT).is_file():
            raise RunDirError(f"{path} is not a run directory (no {cls.BLUEPRINT}); pass the folder "
                              "<runs_dir>/<name>/<timestamp>/ that a training run created")
        return cls(path, keep_checkpoints)

    def meta(self) -> dict[str, Any]:
        f = self.path / self.META
        return json.loads(f.read_text()) if f.is_file() else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_atomic_text(self.path / self.META, json.dumps(meta, indent=2) + "\n")

    def update_meta(self, **changes: Any) -> None:
        self.write_meta({**self.meta(), **changes})
