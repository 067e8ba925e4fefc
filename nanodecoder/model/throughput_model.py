"""Expected training throughput of a blueprint on this machine: FLOPs plus bytes moved, on measured constants.

    work = workload(spec, batch=32, context=128)                  # what one training step does, from the spec alone
    machine = calibrate([work, other_work])                       # a few seconds of micro-benchmarks, alternating
    step = predict(work, machine)                                 # seconds per step, by part; step.tokens_per_s

One training step (``grad_accum`` micro-batches of ``batch x context`` tokens, then one optimizer step) costs

    sum over matmul shape classes  training FLOPs of the class / achieved FLOP/s of the class (forward + backward)
  + sum over streaming ops         bytes moved / achieved streaming bandwidth (two sizes: rows of d_model, logits)
  + sum over row gathers           bytes moved / achieved gather bandwidth (an MoE's dispatch and combine)
  + small ops                      count x time of one small op with autograd (an MoE's router and routing plan)

**Shape classes** (each timed forward + backward at the model's own shapes by :func:`calibrate`): every weight
matmul ``[N, K] @ [K, F]`` of a block, the head and a dense MLP (``mm``); the routed experts of an MoE layer as
its kernel runs them, with their activation, on ``N * top_k / n_experts`` rows each (``experts``: on the CPU
``torch._grouped_mm`` is a loop of per-expert matmuls, slower per FLOP than one matmul of all the rows); the
attention kernel (``sdpa``: ``scaled_dot_product_attention``, causal).  FLOPs are the planner's
(``plan.py``): 2 x weights per token forward, 3 x forward for training.

**Bytes** (compute dtype ``c``, fp32 for the router and the loss), forward + backward per token, counted from
what the components do (``components/``): a norm ``5 D``, a residual add ``6 D``, RoPE ``12`` numbers per q/k
value, the attention's head layout copies ``6`` per q/k/v value, a dense activation ``5`` per hidden unit
(a gated one ``14``), the embedding ``4 D``, the cross-entropy ``7 V`` (fp32), and an MoE layer's row gathers:
dispatch ``2 M D`` forward, ``2 M D`` backward plus the sum over choices ``(k + 1) N D``; combine ``4 M D`` in
gathers and ``(k + 1) N D + 6 M D`` streamed (the weights, the sum, the weight gradient); the router's fp32
``[N, E]`` tensors ``30 E``.  The optimizer step reads and writes ``(3 + 2 states) x 4`` bytes per parameter
plus ``12`` for the gradient clip (``fused`` AdamW: 40 bytes per parameter).

**Small ops**: an MoE layer runs about :data:`MOE_SMALL_OPS` more operator calls than a dense MLP (router, the
routing plan, gather and combine, load-balancing and z losses, their backward nodes), each costing the
dispatch overhead of a small op with autograd at least.

A multi-token-prediction module (``model.mtp``) counts as one more block, its projection and one more head and
loss on every token (it runs on all but its last ``k`` positions).  Not modelled: the small streams of value
embeddings and U-Net skips, Muon's Newton-Schulz matmuls (every optimizer is counted as AdamW's bytes for its states),
activation checkpointing's recomputation, compilation, communication between devices.  The machine constants
come from one process, alternating the micro-benchmarks in rounds (median), so a machine whose speed drifts
shifts all of them alike: the predicted ratio of two models is steadier than either prediction.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from ..components.contracts import FP32
from ..components.mlp import ACTIVATIONS, batched_activation
from ..components.moe_experts import Experts
from .block import NORMS
from .plan import DTYPE_BYTES, param_report
from .spec import ModelSpec

#: operator calls (forward + backward) an MoE layer adds to a dense MLP's: router 10, routing plan 14, gather and
#: combine 8, the experts' offsets and casts 8, load-balancing, z-loss and logged statistics 25, backward nodes 25
MOE_SMALL_OPS = 90
#: bytes per token, forward + backward, in units of numbers of the compute dtype (see the module docstring)
NORM, RESIDUAL, ROPE, HEAD_LAYOUT, EMBEDDING, CROSS_ENTROPY, ROUTER = 5, 6, 12, 6, 4, 7, 30
ACTIVATION = {1: 5, 2: 14}           # by the up-projection's width multiple: plain 1, gated 2
OPTIMIZER_CLIP = 12                  # bytes per parameter: the gradient norm (read) and the clip (read + write)


@dataclass(frozen=True)
class Shape:
    """A matmul shape class: ``mm`` ``(rows, k, f)``; ``experts`` ``(n_experts, rows_each, d, hidden)`` with its
    activation, bias and dispatch; ``sdpa`` ``(batch, heads, kv_heads, context, head_dim)``."""
    kind: str
    dims: tuple[int, ...]
    act: str = ""
    bias: bool = False
    dispatch: str = "auto"

    @property
    def key(self) -> str:
        extra = "".join(f" {v}" for v in (self.act, "bias" if self.bias else "",
                                          "" if self.dispatch == "auto" else self.dispatch) if v)
        return f"{self.kind} {'x'.join(map(str, self.dims))}{extra}"


@dataclass(frozen=True)
class Workload:
    """What one training step does, by part: ``matmuls`` ``(part, shape, FLOPs)``, ``streams`` ``(part, bytes,
    large)`` (large: logit-sized tensors), ``gathers`` ``(part, bytes)``, ``ops`` ``(part, count)``."""
    tokens_per_step: int
    matmuls: tuple[tuple[str, Shape, float], ...]
    streams: tuple[tuple[str, float, bool], ...]
    gathers: tuple[tuple[str, float], ...]
    ops: tuple[tuple[str, float], ...]
    rows: int                       # tokens per micro-batch (the streaming benchmark's rows)
    width: int                      # d_model
    vocab: int

    @property
    def shapes(self) -> list[Shape]:
        return list(dict.fromkeys(s for _, s, _ in self.matmuls))

    @property
    def flops(self) -> float:
        return sum(f for _, _, f in self.matmuls)


def _mm(rows: int, k: int, f: int) -> tuple[Shape, float]:
    return Shape("mm", (rows, k, f)), 6.0 * rows * k * f


def workload(spec: ModelSpec, batch: int, context: int | None = None, grad_accum: int = 1,
             precision: str = "fp32", optimizer_states: float = 2) -> Workload:
    """The step of ``spec`` training ``grad_accum`` micro-batches of ``batch`` sequences of ``context`` tokens
    (default: its context_length) in ``precision``, then one optimizer step keeping ``optimizer_states`` fp32
    values per parameter."""
    T = context or spec.context_length
    N, D, V = batch * T, spec.d_model, spec.vocab_size
    c = DTYPE_BYTES[precision]
    mat: list[tuple[str, Shape, float]] = []
    streams: list[tuple[str, float, bool]] = []
    gathers: list[tuple[str, float]] = []
    ops: list[tuple[str, float]] = []
    groups = list(spec.layer_groups)
    depth = spec.mtp.depth if spec.mtp is not None else 0
    if depth:                               # each MTP module: a block, a [2D -> D] projection, the head and loss again
        groups.append((spec.mtp_block, depth))
        for shape, f in (_mm(N, 2 * D, D), _mm(N, D, V)):
            mat.append(("mtp projection and head", shape, depth * f))
        streams.append(("mtp projection and head", depth * N * V * (CROSS_ENTROPY * FP32 + 2 * c), True))
    for b, n in groups:
        a = b.attention
        widths = getattr(a, "widths", None)
        if widths:
            qkv = widths["q"] + widths["k"] + widths["v"]
            for shape, f in (_mm(N, D, qkv), _mm(N, widths["q"], D)):
                mat.append(("attention", shape, n * f))
        else:                               # another kind: its matmul weights as one projection
            shape, f = _mm(N, D, max(1, round(a.matmul_params / D)))
            mat.append(("attention", shape, n * f))
        E = max(a.score_dim, a.value_dim)
        kv = getattr(a, "kv_heads", a.n_heads)
        mat.append(("attention", Shape("sdpa", (batch, a.n_heads, kv, T, E)), n * 3 * N * a.score_flops(T)))
        qk = a.n_heads * a.score_dim + kv * a.score_dim
        rope = ROPE * qk if b.positional.rotates_heads else 0
        streams.append(("attention", n * N * c * (rope + HEAD_LAYOUT * (qk + kv * a.value_dim)), False))
        norms = FP32 * NORM * len(NORMS[spec.norm_placement])
        streams.append(("norms and residual", n * N * D * (c * RESIDUAL * 2 + norms), False))
        _mlp(b.mlp, n, N, D, c, mat, streams, gathers, ops)
    mat.append(("head", *_mm(N, D, V)))
    streams.append(("embedding and loss", N * (EMBEDDING * D * c + FP32 * NORM * D), False))
    streams.append(("embedding and loss", N * V * (CROSS_ENTROPY * FP32 + 2 * c), True))
    scale = grad_accum
    p = param_report(spec).total
    optimizer = p * ((3 + 2 * optimizer_states) * FP32 + OPTIMIZER_CLIP)
    return Workload(
        tokens_per_step=N * grad_accum,
        matmuls=tuple((part, s, f * scale) for part, s, f in mat),
        streams=tuple((part, x * scale, big) for part, x, big in streams) + (("optimizer", optimizer, True),),
        gathers=tuple((part, x * scale) for part, x in gathers), ops=tuple((part, x * scale) for part, x in ops),
        rows=N, width=D, vocab=V)


def _mlp(m, n: int, N: int, D: int, c: int, mat, streams, gathers, ops) -> None:
    """The MLP's share of a step, ``n`` layers of it, appended to the lists."""
    if not getattr(m, "expert_params", 0) or not hasattr(m, "n_experts"):          # a dense MLP
        act = batched_activation(m)
        if act is None:                     # a plug-in kind: its active weights as one up and one down
            width = max(1, round(m.n_active / (2 * D)))
            for shape, f in (_mm(N, D, width), _mm(N, width, D)):
                mat.append(("mlp", shape, n * f))
            streams.append(("mlp", n * N * c * ACTIVATION[1] * width, False))
            return
        w = ACTIVATIONS[act][1]
        for shape, f in (_mm(N, D, w * m.hidden), _mm(N, m.hidden, D)):
            mat.append(("mlp", shape, n * f))
        streams.append(("mlp", n * N * c * ACTIVATION[w] * m.hidden, False))
        return
    E, k = m.n_experts, m.top_k
    M = N * k                               # dropless: every assignment has a row (a capacity keeps fewer)
    if m.capacity_factor is not None:
        M = min(M, E * math.ceil(max(m.min_capacity, m.capacity_factor * N * k / E)))
    shape, f = _mm(N, D, E)
    mat.append(("moe router", shape, n * f))
    streams.append(("moe router", n * N * E * FP32 * ROUTER, False))
    ops.append(("moe router", n * MOE_SMALL_OPS))
    gathers.append(("moe dispatch and combine", n * 8 * M * D * c))
    streams.append(("moe dispatch and combine", n * (2 * (k + 1) * N * D + 6 * M * D) * c, False))
    expert = m.expert
    act = batched_activation(expert)
    w = ACTIVATIONS[act][1] if act else 1
    H = m.hidden if act else max(1, round(expert.n_params / (2 * D)))
    per_row = expert.n_params - (w * H + D if m.bias else 0)
    rows = max(1, round(M / E))
    mat.append(("moe experts", Shape("experts", (E, rows, D, H), act or "gelu", m.bias, m.dispatch),
                n * 6.0 * E * rows * per_row))
    if m.n_shared_experts:
        S = m.n_shared_experts
        for shape, f in (_mm(N, D, S * w * H), _mm(N, S * H, D)):
            mat.append(("moe shared experts", shape, n * f))
        streams.append(("moe shared experts", n * N * c * ACTIVATION[w] * S * H, False))


# ---------------------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class Machine:
    """Achieved rates of this machine: FLOP/s per shape class (forward + backward), bytes/s of streaming ops on
    rows of d_model and on logit-sized tensors, bytes/s of row gathers, seconds per small op with autograd.
    ``default_flops``: the rate of a shape class not measured (None: such a class is an error)."""
    matmul_flops: Mapping[str, float]
    stream_bandwidth: float
    large_stream_bandwidth: float
    gather_bandwidth: float
    op_seconds: float
    default_flops: float | None = None
    spread: Mapping[str, float] = field(default_factory=dict)    # per benchmark: (max - min) / median over rounds

    def flops(self, shape: Shape) -> float:
        rate = self.matmul_flops.get(shape.key, self.default_flops)
        if rate is None:
            raise KeyError(f"no calibrated rate for the matmul shape '{shape.key}'; calibrate with this workload")
        return rate

    def as_dict(self) -> dict:
        return {"matmul_flops": dict(self.matmul_flops), "stream_bandwidth": self.stream_bandwidth,
                "large_stream_bandwidth": self.large_stream_bandwidth, "gather_bandwidth": self.gather_bandwidth,
                "op_seconds": self.op_seconds, "spread": dict(self.spread)}


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one training step, by part."""
    parts: Mapping[str, float]
    tokens_per_step: int

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.seconds


def predict(work: Workload, machine: Machine) -> StepTime:
    """Seconds per training step of ``work`` on ``machine``, by part (see the module docstring)."""
    parts: dict[str, float] = {}

    def add(part: str, seconds: float) -> None:
        parts[part] = parts.get(part, 0.0) + seconds

    for part, shape, f in work.matmuls:
        add(part, f / machine.flops(shape))
    for part, n_bytes, large in work.streams:
        add(part, n_bytes / (machine.large_stream_bandwidth if large else machine.stream_bandwidth))
    for part, n_bytes in work.gathers:
        add(part, n_bytes / machine.gather_bandwidth)
    for part, count in work.ops:
        add(part, count * machine.op_seconds)
    return StepTime(parts, work.tokens_per_step)


# ---------------------------------------------------------------------------------------- calibration
def _leaf(*shape: int, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device).mul_(0.02).requires_grad_(True)


def _runner(shape: Shape, device: str) -> Callable[[], None]:
    """One forward + backward of ``shape`` on fresh random numbers of its size (the weights' gradients too)."""
    if shape.kind == "mm":
        rows, k, f = shape.dims
        x, w = _leaf(rows, k, device=device), _leaf(k, f, device=device)
        g = torch.randn(rows, f, device=device)
        return lambda: (x @ w).backward(g)
    if shape.kind == "experts":
        n, rows, d, hidden = shape.dims
        experts = Experts(n, d, hidden, shape.act, shape.bias, shape.dispatch).to(device)
        x = _leaf(n * rows, d, device=device)
        counts = torch.full((n,), rows, dtype=torch.int64, device=device)
        g = torch.randn(n * rows, d, device=device)
        return lambda: experts.forward_sorted(x, counts).backward(g)
    if shape.kind == "sdpa":
        b, h, kv, t, e = shape.dims
        q, k, v = _leaf(b, h, t, e, device=device), _leaf(b, kv, t, e, device=device), _leaf(b, kv, t, e, device=device)
        g = torch.randn(b, h, t, e, device=device)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h).backward(g)
    raise ValueError(f"unknown shape class '{shape.kind}'")


def _memory_runners(rows: int, width: int, vocab: int, device: str) -> dict[str, tuple[Callable[[], None], float]]:
    """The memory benchmarks: ``name -> (run once, bytes it moves)``."""
    a, b = torch.randn(rows, width, device=device), torch.randn(rows, width, device=device)
    la, lb = torch.randn(rows, vocab, device=device), torch.randn(rows, vocab, device=device)
    index = torch.randperm(rows, device=device).repeat(2)
    tiny = _leaf(1, device=device)

    def small_ops():
        y = tiny
        for _ in range(10):
            y = y * 1.0001
        y.backward()
    return {"stream": (lambda: a * b, 3.0 * a.numel() * a.element_size()),
            "large stream": (lambda: la * lb, 3.0 * la.numel() * la.element_size()),
            "gather": (lambda: a.index_select(0, index), 2.0 * index.numel() * width * a.element_size()),
            "small op": (small_ops, 20.0)}          # 10 ops forward + 10 backward: seconds per op = t / 20


def calibrate(works: Iterable[Workload], rounds: int = 5, warmup: int = 1, device: str = "cpu",
              clock: Callable[[], float] = time.perf_counter) -> Machine:
    """Time every shape class of ``works`` and the memory benchmarks at their rows, in one process: ``warmup``
    untimed runs each, then ``rounds`` rounds in which each runs once in turn; the median round of each."""
    works = list(works)
    shapes = list(dict.fromkeys(s for w in works for s in w.shapes))
    big = max(works, key=lambda w: w.rows)
    runs: dict[str, tuple[Callable[[], None], float]] = {s.key: (_runner(s, device), 0.0) for s in shapes}
    memory = _memory_runners(big.rows, big.width, big.vocab, device)
    runs.update(memory)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name, (fn, _) in runs.items():
            sync()
            t0 = clock()
            fn()
            sync()
            if i >= warmup:
                times[name].append(clock() - t0)
    med = {name: max(statistics.median(t), 1e-9) for name, t in times.items()}
    flops = {s.key: _flops_of(s) / med[s.key] for s in shapes}
    spread = {name: (max(t) - min(t)) / med[name] for name, t in times.items()}
    return Machine(matmul_flops=flops, stream_bandwidth=memory["stream"][1] / med["stream"],
                   large_stream_bandwidth=memory["large stream"][1] / med["large stream"],
                   gather_bandwidth=memory["gather"][1] / med["gather"], op_seconds=med["small op"] / 20.0,
                   spread=spread)


def _flops_of(shape: Shape) -> float:
    """Training FLOPs of one forward + backward of the benchmark of ``shape`` (the convention of :func:`workload`)."""
    if shape.kind == "mm":
        rows, k, f = shape.dims
        return 6.0 * rows * k * f
    if shape.kind == "experts":
        n, rows, d, hidden = shape.dims
        return 6.0 * n * rows * (ACTIVATIONS[shape.act][1] * hidden * d + hidden * d)
    b, h, kv, t, e = shape.dims
    return 3.0 * b * 2 * h * 2 * e * (t + 1) / 2 * t     # scores and values, causal: (t + 1) / 2 keys on average
