"""Cluster plans: every layout of a model on a cluster of GPUs, and the smallest cluster it fits, from its spec alone.

A **layout** is an FSDP (shard) degree ``fsdp`` dividing the world (``world / fsdp`` replicas: HSDP), an
expert-parallel degree ``ep`` dividing ``fsdp`` and every MoE layer's expert count (the experts of each MoE
layer split over ``ep`` ranks, each rank's experts sharded by FSDP over the other ``fsdp / ep``: torchtitan's
layout), and activation checkpointing on or off.  For each, per GPU and per optimizer step of one micro-batch:

memory
    :meth:`model.plan.Plan.memory` with the model state split over ``fsdp`` (``16 / fsdp`` bytes per parameter
    under AdamW: fp32 weights, gradients and two states) and FSDP's unsharded buffers holding 1/``ep`` of a
    block's experts; activations of ``batch x context`` tokens (routing assumed balanced, so an expert rank
    receives as many rows as it sends).
communication (bytes each GPU receives)
    all-gather: every block's fp32 weights (its experts' 1/ep) twice, once in the forward and once in the
    backward (FSDP2 frees a block's gathered weights after its forward), the root's once, each received from
    ``fsdp - 1`` of ``fsdp`` ranks; reduce-scatter: the gradients of the same, once; all-reduce across replicas
    (HSDP): each GPU's gradient shard, twice (ring); all-to-all: every MoE layer's dispatch and combine, ``top_k``
    rows of ``d_model`` numbers in the compute dtype per token, ``(ep - 1) / ep`` of them leaving the rank, in
    the forward, the backward and (with checkpointing) the recomputed forward.
time
    at a stated MFU (model FLOPs over the GPUs' peak): step time = training FLOPs of the GPU's tokens / (peak x
    MFU); tokens/s for the cluster follow. Communication is assumed hidden behind compute, as MFU figures of
    published runs include it; the bytes say how much there is to hide.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from .plan import (DTYPE_BYTES, FP32, Memory, Plan, Setting, block_groups, block_norm_params, expert_counts,
                   expert_layout_problem, human_bytes, plan, routed_params)
from .spec import ModelSpec

#: peak dense bf16 FLOP/s and memory of the GPUs named most (vendor data sheets; H800 = H100 SXM compute)
GPUS = {"h100": (989e12, 80 * 2 ** 30), "h800": (989e12, 80 * 2 ** 30), "h200": (989e12, 141e9),
        "a100": (312e12, 80 * 2 ** 30), "b200": (2250e12, 180e9)}
UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
         "tib": 2 ** 40}
KEYS = ("nodes", "gpus_per_node", "gpu", "gpu_memory", "gpu_flops", "mfu")


class ClusterError(ValueError):
    """A --cluster description that cannot be read (the message names the key and the fix)."""


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int = 8
    gpu: str = "h100"
    gpu_memory: float = GPUS["h100"][1]     # bytes
    gpu_flops: float = GPUS["h100"][0]      # peak dense bf16 FLOP/s
    mfu: float = 0.4

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node} {self.gpu.upper()} "
                f"= {self.world:,} GPUs of {human_bytes(self.gpu_memory)}, {self.gpu_flops / 1e12:,.0f} TFLOP/s "
                f"peak, at {self.mfu:.0%} MFU")


def _bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in UNITS:
        raise ClusterError(f"--cluster gpu_memory={text}: expected a size such as 80GiB or 141GB")
    return float(m.group(1)) * UNITS[m.group(2) or "b"]


def parse_cluster(text: str) -> Cluster:
    """``"nodes=N,gpus_per_node=8,gpu_memory=80GiB"`` (also ``gpu=h100|h800|h200|a100|b200``, which sets memory
    and peak FLOP/s, ``gpu_flops=989e12``, ``mfu=0.4``) as a :class:`Cluster`."""
    fields: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise ClusterError(f"--cluster '{item}': expected KEY=VALUE with KEY among {', '.join(KEYS)}")
        fields[key] = value.strip()
    if "nodes" not in fields:
        raise ClusterError("--cluster needs nodes=N (and optionally gpus_per_node, gpu, gpu_memory, gpu_flops, mfu)")
    gpu = fields.get("gpu", "h100").lower()
    if gpu not in GPUS:
        raise ClusterError(f"--cluster gpu={gpu}: known GPUs are {', '.join(GPUS)}; give gpu_memory and gpu_flops "
                           "for another")
    flops, memory = GPUS[gpu]

    def number(key: str, default, kind=float):
        try:
            value = kind(float(fields[key])) if key in fields else default
        except ValueError:
            raise ClusterError(f"--cluster {key}={fields[key]}: expected a number") from None
        if not value > 0:
            raise ClusterError(f"--cluster {key}={fields[key]}: must be positive")
        return value

    out = Cluster(nodes=number("nodes", 1, int), gpus_per_node=number("gpus_per_node", 8, int), gpu=gpu,
                  gpu_memory=_bytes(fields["gpu_memory"]) if "gpu_memory" in fields else memory,
                  gpu_flops=number("gpu_flops", flops), mfu=number("mfu", 0.4))
    if out.mfu > 1:
        raise ClusterError(f"--cluster mfu={out.mfu}: a fraction of the peak, at most 1 (e.g. 0.4)")
    return out


@dataclass(frozen=True)
class Layout:
    fsdp: int               # GPUs the model state is sharded over (world / fsdp replicas)
    ep: int                 # GPUs each MoE layer's experts are split over
    checkpointing: bool

    def describe(self) -> str:
        return f"FSDP {self.fsdp} x EP {self.ep}{', ckpt' if self.checkpointing else ''}"


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    replicas: int
    memory: Memory
    all_gather: float
    reduce_scatter: float
    all_reduce: float
    all_to_all: float
    step_time: float        # seconds
    tokens_per_s: float     # the whole cluster's
    fits: bool

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self.layout), "replicas": self.replicas, "memory_bytes": self.memory.as_dict(),
                "all_gather_bytes": self.all_gather, "reduce_scatter_bytes": self.reduce_scatter,
                "all_reduce_bytes": self.all_reduce, "all_to_all_bytes": self.all_to_all,
                "step_time_s": self.step_time, "tokens_per_s": self.tokens_per_s, "fits": self.fits}


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def layouts(spec: ModelSpec, world: int) -> list[Layout]:
    """Every layout of ``spec`` on ``world`` GPUs."""
    counts = expert_counts(spec)
    out = []
    for fsdp in _divisors(world):
        for ep in _divisors(fsdp) if counts else [1]:
            if not expert_layout_problem(spec, ep, fsdp):       # experts split within each FSDP group
                out += [Layout(fsdp, ep, False), Layout(fsdp, ep, True)]
    return out


def plan_layout(base: Plan, cluster: Cluster, layout: Layout) -> LayoutPlan:
    """The per-GPU figures of one layout (see the module docstring)."""
    spec, st = base.spec, base.setting
    f, e = layout.fsdp, layout.ep
    p = dataclasses.replace(base, setting=dataclasses.replace(st, world_size=f, sharded=f > 1, expert_parallel=e))
    memory = p.memory(layout.checkpointing)
    groups = block_groups(spec)
    blocks = sum(n * (b.attention.n_params + b.mlp.n_params - routed_params(b.mlp) * (1 - 1 / e)) for b, n in groups)
    norms = sum(n * block_norm_params(spec, b) for b, n in groups)     # gathered with their blocks
    blocks += norms
    root = base.params.total - sum(n * (b.attention.n_params + b.mlp.n_params) for b, n in groups) - norms
    share = (f - 1) / f
    all_gather = FP32 * share * (2 * blocks + root)
    reduce_scatter = FP32 * share * (blocks + root)
    replicas = cluster.world // f
    all_reduce = 2 * FP32 * (base.params.total / f) * (replicas - 1) / replicas
    tokens = st.batch * st.context
    moe_rows = sum(n * b.mlp.top_k for b, n in groups if b.mlp.expert_params)
    passes = 3 if layout.checkpointing else 2
    all_to_all = passes * 2 * tokens * moe_rows * spec.d_model * DTYPE_BYTES[st.precision] * (e - 1) / e
    step_time = base.flops.training * tokens / (cluster.gpu_flops * cluster.mfu)
    return LayoutPlan(layout, replicas, memory, all_gather, reduce_scatter, all_reduce, all_to_all, step_time,
                      cluster.world * tokens / step_time, memory.total <= cluster.gpu_memory)


def cluster_plans(base: Plan, cluster: Cluster) -> list[LayoutPlan]:
    return [plan_layout(base, cluster, lay) for lay in layouts(base.spec, cluster.world)]


def frontier(plans: list[LayoutPlan]) -> list[LayoutPlan]:
    """For each EP degree, the fitting layout with the least sharding (less to gather), without checkpointing where
    that fits: the layouts worth choosing between."""
    best: dict[int, LayoutPlan] = {}
    for lp in sorted((lp for lp in plans if lp.fits), key=lambda lp: (lp.layout.fsdp, lp.layout.checkpointing)):
        best.setdefault(lp.layout.ep, lp)
    return [best[e] for e in sorted(best)]


def smallest_cluster(base: Plan, cluster: Cluster, max_nodes: int = 2 ** 16) -> tuple[Cluster, LayoutPlan] | None:
    """The fewest nodes (powers of two, ``cluster``'s GPUs) on which some layout fits, and the least-sharded such
    layout; None if none up to ``max_nodes``."""
    nodes = 1
    while nodes <= max_nodes:
        c = dataclasses.replace(cluster, nodes=nodes)
        fitting = frontier(cluster_plans(base, c))
        if fitting:
            return c, min(fitting, key=lambda lp: (lp.memory.total, lp.layout.fsdp))
        nodes *= 2
    return None


def base_plan(spec: ModelSpec, setting: Setting) -> Plan:
    """The single-GPU plan the layouts start from (CUDA kernels)."""
    return plan(spec, dataclasses.replace(setting, world_size=1, sharded=False, expert_parallel=1, device="cuda"))
