"""Plots in the run directory: ``loss.png`` and, for MoE models, ``expert_load.png``.

Drawn with matplotlib's Agg backend (no display); each file is written to a
temporary name and renamed, so a reader never sees a half-written image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train and validation loss against steps (left) and tokens (right)."""
    train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    val = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("step", "tokens")):
        if train:
            ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_expert_load(load: dict[int, list[float]], path: Path, step: int) -> None:
    """Heatmap of the fraction of routed tokens per expert (rows: MoE layers)."""
    if not load:
        return
    layers = sorted(load)
    width = max(len(load[layer]) for layer in layers)
    grid = [load[layer] + [float("nan")] * (width - len(load[layer])) for layer in layers]
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.25 * width + 2)),
                                    min(10.0, max(3.0, 0.35 * len(layers) + 1.8))))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(f"expert load at step {step}\n(fraction of routed tokens; uniform = {1 / width:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
