"""Metrics rows: ``metrics.jsonl`` (one JSON object per log or eval step) and W&B.

Every row carries ``kind`` ("train" or "eval"), ``step`` and ``tokens``.  The
same rows go to ``metrics.jsonl`` and, flattened, to Weights & Biases, so the
two always agree.  :class:`MoEMonitor` turns a model's MoE statistics into
metrics and warns about experts that stay empty.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to numbers/lists; non-finite floats to None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def flat_scalars(row: dict[str, Any]) -> dict[str, float]:
    """Row -> scalar metrics for W&B (a list value ``x`` becomes ``x/0``, ``x/1``...)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("kind", "step"):
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                out[f"{key}/{i}"] = v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


class MetricsLog:
    """Append rows to ``metrics.jsonl`` (flushed per row) and forward them to W&B."""

    def __init__(self, path: Path, wandb_run=None):
        self.path = Path(path)
        self.wandb_run = wandb_run
        self.rows: list[dict[str, Any]] = read_rows(self.path)
        self._f = open(self.path, "a")

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run re-does those steps)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self._f.close()
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._f = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.wandb_run is not None:
            prefix = "val/" if row.get("kind") == "eval" else "train/"
            self.wandb_run.log({prefix + k: v for k, v in flat_scalars(row).items()}, step=row["step"])
        return row

    def close(self) -> None:
        self._f.close()


def read_rows(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


class MoEMonitor:
    """Per-layer MoE statistics as metrics, plus empty-expert warnings.

    ``stats`` keys follow the model's ``ModelOutput.stats``: ``layer3.load``
    ([E] fractions of routed assignments), ``layer3.lb_loss``,
    ``layer3.dropped_frac``, ``layer3.router_entropy``, ``layer3.z_loss``...
    """

    def __init__(self, warn_after: int = 5, warn: Callable[[str], None] = print):
        self.warn_after = warn_after
        self.warn = warn
        self.empty_streak: dict[tuple[int, int], int] = defaultdict(int)
        self.warned: set[tuple[int, int]] = set()
        self.load: dict[int, list[float]] = {}  # latest load per layer (for the heatmap)

    @staticmethod
    def split(key: str) -> tuple[int, str] | None:
        head, _, name = key.partition(".")
        if not head.startswith("layer") or not head[5:].isdigit() or not name:
            return None
        return int(head[5:]), name

    def metrics(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        empty_total = 0
        for key, value in sorted(stats.items()):
            parsed = self.split(key)
            if parsed is None:
                continue
            layer, name = parsed
            value = value.detach().float().cpu()
            prefix = f"moe/layer{layer}"
            if name == "load":
                load = value.tolist()
                self.load[layer] = load
                out[f"{prefix}/load"] = load
                lo, hi = min(load), max(load)
                out[f"{prefix}/load_max_min"] = hi / lo if lo > 0 else None
                empty = [e for e, f in enumerate(load) if f <= 0.0]
                empty_total += len(empty)
                self._track(layer, len(load), empty, step)
            elif value.numel() == 1:
                out[f"{prefix}/{name}"] = value.item()
        if self.load:
            out["moe/empty_experts"] = empty_total
        return out

    def _track(self, layer: int, n_experts: int, empty: list[int], step: int) -> None:
        for e in range(n_experts):
            key = (layer, e)
            self.empty_streak[key] = self.empty_streak[key] + 1 if e in empty else 0
            if self.empty_streak[key] >= self.warn_after and key not in self.warned:
                self.warned.add(key)
                self.warn(f"warning: step {step}: expert {e} of layer {layer} received no tokens for "
                          f"{self.empty_streak[key]} log steps in a row (router collapse? raise lb_loss_coef "
                          "or use a bias-balanced router)")
