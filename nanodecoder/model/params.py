"""Parameter counts of a built model: the rows the analytic count (``model.plan``) is checked against.

* ``total``: every distinct parameter (a tied head counts once).
* ``active``: parameters used per token: routed experts count k of n
  (each MoE module reports its ``inactive_params_per_token``).
* ``embedding``: token embedding + learned positions + value embeddings (tables and their mixing scalars;
  ``model.value_embeddings``) (+ an untied output
  head is listed as its own row and counted as non-embedding, as it is a
  real matmul per token).

FLOPs and memory come from the spec alone: ``model.plan`` (``flops_per_token``, ``plan``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .builder import build_model, unwrap


@dataclass
class Row:
    name: str
    count: int
    active: float


@dataclass
class ParamReport:
    total: int
    active: int
    embedding: int
    rows: list[Row] = field(default_factory=list)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def as_dict(self) -> dict:
        return {"total": self.total, "active": self.active, "embedding": self.embedding,
                "non_embedding": self.non_embedding, "active_non_embedding": self.active_non_embedding,
                "components": [{"name": r.name, "params": r.count, "active": int(round(r.active))}
                               for r in self.rows]}

    def table(self) -> str:
        w = max([len(r.name) for r in self.rows] + [26])
        lines = [f"{'component':<{w}} {'params':>14} {'active/token':>14}", "-" * (w + 30)]
        for r in self.rows:
            lines.append(f"{r.name:<{w}} {r.count:>14,} {int(round(r.active)):>14,}")
        lines.append("-" * (w + 30))
        lines.append(f"{'total':<{w}} {self.total:>14,} {self.active:>14,}")
        lines.append(f"{'  embedding':<{w}} {self.embedding:>14,}")
        lines.append(f"{'  non-embedding':<{w}} {self.non_embedding:>14,} {self.active_non_embedding:>14,}")
        return "\n".join(lines)


def _numel(module: nn.Module, seen: set[int]) -> int:
    n = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _inactive(module: nn.Module) -> float:
    return sum(m.inactive_params_per_token() for m in module.modules() if hasattr(m, "inactive_params_per_token"))


def count_params(model: nn.Module) -> ParamReport:
    """Count a built model (any device, ``meta`` included) by component."""
    model = unwrap(model)
    seen: set[int] = set()
    groups: "OrderedDict[str, list[float]]" = OrderedDict()

    def add(name: str, module: nn.Module) -> int:
        n = _numel(module, seen)
        g = groups.setdefault(name, [0, 0.0])
        g[0] += n
        g[1] += n - _inactive(module)
        return n

    embedding = add("token embedding", model.wte)
    embedding += add(f"positional ({model.spec.positional.kind})", model.pos)
    spec = model.spec
    for block, bspec in zip(model.blocks, spec.blocks):
        add_block(add, block, bspec)
        if hasattr(block, "value_embed"):
            embedding += add("value embeddings", block.value_embed)
    add(f"final norm ({spec.final.kind})", model.norm)
    add("output head (untied)" if not spec.tie_embeddings else "output head (tied)", model.head)
    if hasattr(model, "skips"):
        add("skip weights (unet)", model.skips)
    for module in getattr(model, "mtp", ()):
        for norm in (module.hnorm, module.enorm, module.norm):
            add(f"mtp norm ({spec.final.kind})", norm)
        add("mtp projection", module.proj)
        add_block(add, module.block, spec.mtp_block, "mtp ")
    rows = [Row(name, int(c), a) for name, (c, a) in groups.items() if c or name.startswith("output head")]
    total = sum(r.count for r in rows)
    active = int(round(sum(r.active for r in rows)))
    return ParamReport(total=total, active=active, embedding=embedding, rows=rows)


def add_block(add, block: nn.Module, bspec, prefix: str = "") -> None:
    """The rows of one block: its norms, attention and MLP (``prefix``: ``mtp `` for a module's block)."""
    for norm in block.norms():
        add(f"{prefix}norm ({bspec.norm.kind})", norm)
    add(f"{prefix}attention ({bspec.attention.kind})", block.attn)
    add(f"{prefix}mlp ({bspec.mlp.kind})", block.mlp)


def count_blueprint(model_spec) -> ParamReport:
    """Count a model spec by building it on the meta device (no memory used; the tests check the analytic
    ``model.plan.param_report`` against it)."""
    with torch.device("meta"):
        return count_params(build_model(model_spec, device="meta"))
