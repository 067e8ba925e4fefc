"""Plan a model from its spec alone: parameters, FLOPs and memory, before anything is built.

Nothing here builds the model: every number is arithmetic on the :class:`ModelSpec`
(plus two probes on a few hundred numbers, see :func:`norm_bytes_per_token` and
:func:`activation_units`), summed over its distinct blocks (``ModelSpec.layer_groups``), not
its layers, so a 671B-parameter blueprint, or one of 10**9 layers, plans in milliseconds.

Parameters (``plan.params``, the rows of ``model.params.count_params`` without a module)
    total; active per token (routed experts count top_k of n_experts); embedding
    (token + learned positions; an untied output head is non-embedding).

FLOPs per token: model FLOPs, the convention of MFU
    forward = 2 x the active weights of every matmul (attention, MLP or experts,
    router, output head -- tied or not) + attention: per layer
    2 x n_heads x (score_dim + value_dim) x keys attended, where with causal masking the
    token at position t attends t + 1 keys (a windowed layer at most ``window``),
    averaged over a sequence of ``context`` tokens.  Training = 3 x forward (the backward
    is twice the forward).  Activation checkpointing runs each block's forward once
    more: ``recompute`` (hardware FLOPs, not counted in MFU).  Not counted: norms,
    activation functions, softmax, bias additions (well under 1%).

Memory (bytes; per device: FSDP shards the model state over ``world_size``)
    weights and gradients in fp32 (the runtime keeps fp32 master weights under every
    precision); optimizer state = its fp32 states per parameter (AdamW: 2); under
    bf16/fp16 autocast a 2-byte copy of every matmul weight, made by the casts and kept
    for the backward; activations = what autograd saves for the backward, tensor by
    tensor as our components produce them (see :func:`block_bytes`), deduplicated by
    storage: no recomputation; the residual stream, norms and the router in fp32,
    everything else in the compute precision; the logits, their fp32 log-probabilities
    and the loss gradient of one micro-batch.  With activation checkpointing every block
    keeps only its input, plus one block's activations while it is recomputed.
    Everything is summed as if alive at once: an upper bound (gradients appear while
    the backward frees activations), not counting the allocator's fragmentation, the
    CUDA context (~0.5 GiB) or transient buffers of one layer's backward.

KV cache (sampling): ``cache_width`` numbers per position and layer; a windowed layer
holds at most ``window`` positions.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..components.mlp import ACTIVATIONS
from ..components.moe_experts import CPU_LOW_PRECISION_ROWS
from .block import NORMS
from .params import ParamReport, Row
from .spec import ModelSpec

#: bytes of one number in each precision's compute dtype ('mixed': bf16 or fp16, two bytes either way)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 2}
FP32 = 4
INDEX = 8                    # int64 token ids and routing indices
PROBE_WIDTH = 8              # the norm probes' width (norm_bytes_per_token)


def dropout_mask(dtype_bytes: int, device: str) -> int:
    """Bytes of a dropout mask per element: a bool on CUDA, the input's dtype on the CPU."""
    return dtype_bytes if device == "cpu" else 1


# ---------------------------------------------------------------------------------------- parameters
def param_report(spec: ModelSpec) -> ParamReport:
    """Parameters by component from the spec alone, in the rows and names of ``count_params``."""
    rows: dict[str, list[float]] = {}

    def add(name: str, count: float, active: float | None = None) -> None:
        row = rows.setdefault(name, [0, 0.0])
        row[0] += count
        row[1] += count if active is None else active

    embedding = spec.vocab_size * spec.d_model + spec.positional.n_params
    add("token embedding", spec.vocab_size * spec.d_model)
    add(f"positional ({spec.positional.kind})", spec.positional.n_params)
    for b, n in spec.layer_groups:
        add(f"norm ({b.norm.kind})", n * len(NORMS[spec.norm_placement]) * b.norm.n_params)
        add(f"attention ({b.attention.kind})", n * b.attention.n_params)
        add(f"mlp ({b.mlp.kind})", n * b.mlp.n_params, n * getattr(b.mlp, "n_active", b.mlp.n_params))
    add(f"final norm ({spec.final.kind})", spec.final.n_params)
    head = "output head (tied)" if spec.tie_embeddings else "output head (untied)"
    add(head, 0 if spec.tie_embeddings else spec.vocab_size * spec.d_model)
    out = [Row(name, int(c), a) for name, (c, a) in rows.items() if c or name == head]
    return ParamReport(total=sum(r.count for r in out), active=int(round(sum(r.active for r in out))),
                       embedding=embedding, rows=out)


# ---------------------------------------------------------------------------------------- FLOPs
def mean_keys(context: int, window: int | None) -> float:
    """Keys a query attends on average over positions 0..context-1 (causal: t + 1, at most ``window``)."""
    if window is None or window >= context:
        return (context + 1) / 2
    return (window * (window + 1) / 2 + (context - window) * window) / context


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per token, split into weight matmuls (blocks and head) and attention."""
    block_matmuls: float
    head: float
    attention: float

    @property
    def forward(self) -> float:
        return self.block_matmuls + self.head + self.attention

    @property
    def training(self) -> float:
        """Forward + backward (3 x forward): the model FLOPs of MFU."""
        return 3 * self.forward

    @property
    def recompute(self) -> float:
        """What activation checkpointing adds: every block's forward once more (the head is not recomputed)."""
        return self.block_matmuls + self.attention

    def as_dict(self) -> dict:
        return {"forward": self.forward, "forward_matmuls": self.block_matmuls + self.head,
                "forward_attention": self.attention, "training": self.training,
                "training_with_recompute": self.training + self.recompute}


def flops(spec: ModelSpec, context: int | None = None) -> Flops:
    """Forward FLOPs per token of ``spec`` at ``context`` tokens (default: its context_length); see the module
    docstring for the convention."""
    T = context or spec.context_length
    matmuls = attention = 0.0
    for b, n in spec.layer_groups:
        a = b.attention
        matmuls += 2 * n * (a.n_params + getattr(b.mlp, "n_active", b.mlp.n_params))
        attention += 2 * n * a.n_heads * (a.score_dim + a.value_dim) * mean_keys(T, a.window)
    return Flops(block_matmuls=matmuls, head=2.0 * spec.d_model * spec.vocab_size, attention=attention)


def flops_per_token(spec_or_model, context_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of a ModelSpec or a built model (its spec; nothing is run)."""
    spec = spec_or_model if isinstance(spec_or_model, ModelSpec) else spec_or_model.spec
    return flops(spec, context_length).training


# ---------------------------------------------------------------------------------------- activations
def _saved(fn, x: torch.Tensor, skip=()) -> tuple[dict[int, int], torch.Tensor]:
    """``{storage: bytes}`` autograd saves while ``fn(x)`` runs (the storages of ``skip`` left out) and the
    output."""
    skipped = {t.untyped_storage().data_ptr() for t in skip}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skipped:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return seen, out


def norm_bytes_per_token(norm) -> float:
    """Bytes a norm saves per token (its input and statistics; not its output, which its consumer saves):
    measured once on two tokens at widths 8 and 16 and extended to the norm's width (the saved input grows with
    the width, the statistics do not), so that no width, however large, is ever allocated."""
    narrow, wide = (_norm_probe(dataclasses.replace(norm, dim=w)) for w in (PROBE_WIDTH, 2 * PROBE_WIDTH))
    return narrow + (wide - narrow) * (norm.dim - PROBE_WIDTH) / PROBE_WIDTH


@functools.lru_cache(maxsize=None)
def _norm_probe(norm) -> float:
    module = norm.build()
    tokens = 2
    seen, out = _saved(module, torch.randn(tokens, norm.dim, requires_grad=True), skip=list(module.parameters()))
    seen.pop(out.untyped_storage().data_ptr(), None)
    return sum(seen.values()) / tokens


@functools.lru_cache(maxsize=None)
def activation_units(name: str) -> float:
    """Numbers saved per hidden unit from an MLP's up-projection output to its down-projection input (both
    included), for the activation ``name`` of ``mlp.ACTIVATIONS``: measured once on 2 x 8 units."""
    fn, width = ACTIVATIONS[name]
    tokens, hidden = 2, 8
    seen, out = _saved(fn, torch.randn(tokens, width * hidden, requires_grad=True))
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(seen.values()) / FP32 / (tokens * hidden)


def _mlp_activation(mlp) -> str | None:
    name = getattr(mlp, "expert_kind", None) or getattr(mlp.impl, "ACT", None)
    return name if name in ACTIVATIONS else None


def mlp_bytes_per_token(mlp, c: int, device: str = "cuda") -> float:
    """Bytes a feed-forward layer (dense or MoE) saves per token, its input included (``c``: compute bytes)."""
    D = mlp.dim
    name = _mlp_activation(mlp)
    hidden = getattr(mlp, "hidden", None)
    if name is None or hidden is None:        # an unknown kind: its input and 2 numbers per hidden unit
        return D * c + 2 * c * (hidden or mlp.n_params / (2 * D))
    per_expert = activation_units(name) * hidden * c
    k = getattr(mlp, "top_k", None)
    if k is None:                             # dense: input, activations, dropout mask
        return D * c + per_expert + (D * dropout_mask(c, device) if getattr(mlp, "dropout", 0) else 0)
    shared = getattr(mlp, "n_shared_experts", 0)
    E = mlp.n_experts
    # the router runs in fp32: it keeps the input, logits and probabilities; each of the k assignments keeps
    # its gathered input, the expert's activations and output, its weight and four index entries
    routed = D * FP32 + 2 * E * FP32 + k * (D * c + per_expert + D * c + c + FP32 + 4 * INDEX) + 3 * FP32
    cast = D * c if shared and c < FP32 else 0   # the shared experts' matmul casts the fp32 input
    return routed + shared * per_expert + cast


def expert_padding_bytes(mlp, c: int, device: str) -> float:
    """Bytes the zero rows of a CPU bf16/fp16 expert loop save per layer and micro-batch: each expert's rows
    are padded to a multiple of ``CPU_LOW_PRECISION_ROWS``, (multiple - 1) / 2 rows on average; each keeps its
    compute-dtype input and activations."""
    name = _mlp_activation(mlp)
    if (getattr(mlp, "top_k", None) is None or device != "cpu" or c == FP32 or name is None
            or getattr(mlp, "dispatch", "auto") == "grouped_mm"):
        return 0.0
    per_row = mlp.dim * c + activation_units(name) * mlp.hidden * c
    return mlp.n_experts * (CPU_LOW_PRECISION_ROWS - 1) / 2 * per_row


@dataclass(frozen=True)
class AttentionBytes:
    per_token: float      # numbers that scale with the tokens
    per_sequence: float   # [T, S] terms of one sequence (probabilities)
    per_batch: float      # [T, S] masks, one per layer and micro-batch


def attention_bytes(a, T: int, c: int, rotates: bool, device: str) -> AttentionBytes:
    """What one attention layer saves for a sequence of T tokens, its input included.

    Plain causal attention runs a fused SDPA kernel: q, k and v (grouped keys and values stay n_kv_heads wide:
    SDPA's ``enable_gqa``), the output and the log-sum-exp; where q is a view of the qkv projection (no RoPE, no qk-norm) the
    whole projection stays alive, and where it is not the output is copied once more for the out-projection.
    Under CPU autocast everything between the projections runs in fp32 (torch's bf16 CPU attention is slower):
    the causal layer casts its qkv projection to fp32 once, MLA hands SDPA fp32 copies of q, k and v.
    A window, soft-capping and sinks take our explicit path, which keeps q, k, v copies, a [T, T] mask, the
    probabilities ([T, T + sinks] per head: all T keys, masked or not; fp32 plus a compute-dtype copy under CUDA
    autocast) and the soft-capped scores; so does SDPA's math path, which the CPU takes for attention dropout or
    values narrower than the scores (computing q, k, v and the probabilities in fp32). Low-rank latents (MLA's
    ``q_lora_rank``, ``kv_lora_rank``) add their norms (fp32 input, product and statistics) and the
    up-projections' inputs, and the up-projected keys and values form the buffer that stays alive.
    """
    H, s, v, D = a.n_heads, a.score_dim, a.value_dim, a.dim
    K = getattr(a, "kv_heads", H)
    qk_norm = getattr(a, "qk_norm", False)
    fused = getattr(a, "fused", True)
    dropout = getattr(a, "dropout", 0.0)
    latents = [w for w in (getattr(a, "q_lora_rank", None), getattr(a, "kv_lora_rank", None)) if w]
    cpu_math = device == "cpu" and fused and bool(dropout or s != v)
    math = not fused or cpu_math
    mask = dropout_mask(c, device)
    per_token = D * c + (D * mask if dropout else 0)                  # the input, the output dropout's mask
    per_token += sum((2 * w + 1) * FP32 + w * c for w in latents)
    per_sequence = 0.0
    ac = FP32 if device == "cpu" and not latents else c    # CPU autocast casts the qkv projection to fp32
    if qk_norm:   # runs in fp32: keeps its input (the qkv buffer, or fp32 copies of q and k), one product, stats
        kept = (H * s + K * s + K * v) * ac if ac == FP32 else (H + K) * s * FP32
        per_token += kept + (H + K) * (s + 1) * FP32
    if math:
        m = FP32 if cpu_math else c
        per_token += (2 * H * s + H * v) * m + H * v * c              # q, k, v copies; the output copy
        probs = m if m == FP32 or device == "cpu" else FP32 + c
        extra = 1 if getattr(a, "sinks", False) else 0
        per_sequence = H * T * ((T + extra) * probs + (T * m if getattr(a, "logit_softcap", None) else 0)
                                + (T * (mask + m) if dropout else 0))
    elif device == "cpu" and c < FP32 and latents:
        # MLA under CPU autocast: SDPA runs on fp32 copies of q, k and v (components.attention.sdpa)
        per_token += (H * s + H * (s + v)) * FP32 + H * v * (FP32 + c) + H * FP32
    else:
        new_q = rotates or qk_norm                                     # rotated or normed q and k are new
        # v (at least) is a view of the qkv buffer, which stays alive (counted above where the fp32 qk-norm keeps it)
        views = not (qk_norm and ac == FP32)
        buffer = H * (s + v) if latents else H * s + K * s + K * v
        kv_heads = H if latents else K                                 # SDPA groups the heads itself
        per_token += (new_q * (H + kv_heads) * s + views * buffer) * ac
        # the output (and its copy; under CPU autocast an fp32 output and the out-projection's input), log-sum-exp
        per_token += (H * v * c * (1 + new_q) if ac == c else H * v * (FP32 + c)) + H * FP32
    return AttentionBytes(per_token, per_sequence, T * T if not fused else 0)


def block_bytes(spec: ModelSpec, b, T: int, c: int, device: str) -> tuple[float, float]:
    """``(bytes per sequence, bytes per micro-batch)`` one block saves for the backward: its norms (each keeps
    its input), the attention and the MLP (each keeps its input: a norm's output, in the compute dtype)."""
    rotates = getattr(spec.positional.impl, "ROTATES_HEADS", False)
    a = attention_bytes(b.attention, T, c, rotates, device)
    norms = len(NORMS[spec.norm_placement]) * norm_bytes_per_token(b.norm)
    return (T * (norms + a.per_token + mlp_bytes_per_token(b.mlp, c, device)) + a.per_sequence,
            a.per_batch + expert_padding_bytes(b.mlp, c, device))


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch, by part."""
    embedding: float      # token ids (+ the embedding dropout's mask)
    blocks: float         # every block's saved tensors
    head: float           # final norm, head input, fp32 log-probabilities (+ soft-capped logits)
    logits: float         # the logits the caller holds and the fp32 loss gradient at the start of the backward
    block_inputs: float   # with checkpointing: the input of every block, fp32
    largest_block: float  # with checkpointing: one block recomputed

    @property
    def saved(self) -> float:
        """What autograd saves without checkpointing (the saved_tensors_hooks measurement)."""
        return self.embedding + self.blocks + self.head

    def total(self, checkpointing: bool) -> float:
        inner = self.block_inputs + self.largest_block if checkpointing else self.blocks
        return self.embedding + inner + self.head + self.logits


def activations(spec: ModelSpec, T: int, batch: int = 1, precision: str = "fp32",
                device: str = "cuda") -> Activations:
    """Activation bytes of a micro-batch of ``batch`` sequences of ``T`` tokens (see the module docstring)."""
    c = DTYPE_BYTES[precision]
    tokens = batch * T
    per_block = []                                   # (bytes of one such block, layers)
    for b, n in spec.layer_groups:
        seq, once = block_bytes(spec, b, T, c, device)
        per_block.append((batch * seq + once, n))
    D, V = spec.d_model, spec.vocab_size
    softcap = V * c if spec.logit_softcap is not None else 0
    head = tokens * (norm_bytes_per_token(spec.final) + D * c + V * FP32 + softcap)
    dropped = D * dropout_mask(FP32, device) if spec.dropout else 0
    return Activations(embedding=tokens * (INDEX + dropped), blocks=sum(b * n for b, n in per_block), head=head,
                       logits=tokens * V * (c + FP32), block_inputs=tokens * D * FP32 * spec.n_layers,
                       largest_block=max(b for b, _ in per_block))


# ---------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Setting:
    """What a plan is for."""
    context: int
    batch: int = 1                 # sequences per micro-batch on each device
    precision: str = "fp32"        # compute precision (fp32, bf16, fp16, mixed); weights stay fp32
    optimizer_states: float = 2    # fp32 values the optimizer keeps per parameter (AdamW: 2)
    optimizer: str = "adamw"
    world_size: int = 1
    sharded: bool = False          # FSDP: weights, gradients and optimizer state split over world_size
    checkpointing: bool = False    # the run's choice (both plans are computed)
    device: str = "cuda"           # the kernels' device ("cpu": dropout masks as wide as their input, ...)

    def describe(self) -> str:
        ranks = (f", {'FSDP' if self.sharded else 'DDP'} over {self.world_size} devices"
                 if self.world_size > 1 else "")
        return (f"precision {self.precision} (weights fp32, activations {_dtype_name(self.precision)}), "
                f"optimizer {self.optimizer} ({self.optimizer_states:g} fp32 states/parameter), micro-batch "
                f"{self.batch} x {self.context:,} tokens per device{ranks}, {self.device} kernels")


def _dtype_name(precision: str) -> str:
    return {"fp32": "fp32", "fp16": "fp16"}.get(precision, "bf16")


@dataclass(frozen=True)
class Memory:
    """Bytes on one device."""
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float      # autocast's compute-dtype copies of the matmul weights
    gathered: float           # FSDP: the root's and two blocks' unsharded weights, one block's gradients
    activations: float

    @property
    def model_state(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        return self.model_state + self.weight_copies + self.activations

    ROWS = (("weights", "weights (fp32)"), ("gradients", "gradients (fp32)"), ("optimizer", "optimizer state"),
            ("weight_copies", "autocast weight copies"), ("gathered", "FSDP unsharded buffers"),
            ("activations", "activations"), ("total", "total"))

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key, _ in self.ROWS}


def _router(mlp) -> float:
    """Parameters of an MoE layer's router (it runs in fp32: never cast)."""
    router = getattr(mlp, "router", None)
    return router.n_params if router is not None else 0


def _expert_params(mlp) -> float:
    """Parameters of an MoE layer's experts (cast with an explicit ``.to``, not cached by autocast)."""
    return mlp.n_params - _router(mlp) if getattr(mlp, "n_experts", None) is not None else 0


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    setting: Setting
    params: ParamReport
    flops: Flops
    acts: Activations

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.setting.precision]

    @property
    def compute_dtype(self) -> str:
        return _dtype_name(self.setting.precision)

    @property
    def kv_cache_per_token(self) -> float:
        """Bytes the KV cache holds per position of a full-attention context, all layers, compute dtype."""
        return sum(n * b.attention.cache_width for b, n in self.spec.layer_groups) * self.compute_bytes

    @property
    def kv_cache_per_sequence(self) -> float:
        """Bytes of the KV cache of one sequence of ``context`` tokens (a windowed layer holds its window)."""
        T = self.setting.context
        return sum(n * b.attention.cache_width * min(T, b.attention.window or T)
                   for b, n in self.spec.layer_groups) * self.compute_bytes

    def memory(self, checkpointing: bool | None = None) -> Memory:
        """Per-device bytes of a training step (``checkpointing``: default the setting's)."""
        st, spec = self.setting, self.spec
        checkpointing = st.checkpointing if checkpointing is None else checkpointing
        P = self.params.total
        shards = st.world_size if st.sharded else 1
        head = spec.vocab_size * spec.d_model
        groups = spec.layer_groups
        blocks = [(b.attention.n_params + b.mlp.n_params, n) for b, n in groups]      # (one block's, layers)
        matmul = sum(n * (b.attention.n_params + b.mlp.n_params - _router(b.mlp)) for b, n in groups) + head
        experts = [(_expert_params(b.mlp), n) for b, n in groups]
        copies = 0.0
        if DTYPE_BYTES[st.precision] < FP32:
            all_experts = sum(e * n for e, n in experts)
            held = matmul - all_experts + max(e for e, _ in experts) if checkpointing else matmul   # one block's
            copies = DTYPE_BYTES[st.precision] * held / shards
        gathered = 0.0
        if st.sharded and st.world_size > 1:
            root = P - sum(w * n for w, n in blocks) - sum(n * len(NORMS[spec.norm_placement]) * b.norm.n_params
                                                         for b, n in groups)
            gathered = FP32 * (root + 3 * max(w for w, _ in blocks))
        return Memory(weights=FP32 * P / shards, gradients=FP32 * P / shards,
                      optimizer=FP32 * st.optimizer_states * P / shards, weight_copies=copies, gathered=gathered,
                      activations=self.acts.total(checkpointing))

    def as_dict(self) -> dict:
        st = self.setting
        return {"setting": dataclasses.asdict(st), "params": self.params.as_dict(),
                "flops": {"per_token": self.flops.as_dict()},
                "memory_bytes": {"no_checkpointing": self.memory(False).as_dict(),
                                 "activation_checkpointing": self.memory(True).as_dict()},
                "activation_bytes": {"per_token": self.acts.total(False) / (st.batch * st.context),
                                     "per_token_checkpointing": self.acts.total(True) / (st.batch * st.context),
                                     "parts": dataclasses.asdict(self.acts)},
                "kv_cache_bytes": {"per_token": self.kv_cache_per_token, "per_sequence": self.kv_cache_per_sequence},
                "inference_weights_bytes": self.params.total * self.compute_bytes}

    def memory_table(self, indent: str = "  ") -> str:
        """Both memory plans side by side, the run's marked."""
        plans = {False: self.memory(False), True: self.memory(True)}
        mark = {c: " (this run)" if c == self.setting.checkpointing else "" for c in plans}
        head1, head2 = "no checkpointing" + mark[False], "checkpointing" + mark[True]
        w = max(len(head1), len(head2), 12)
        lines = [f"{indent}{'':<26} {head1:>{w}}   {head2:>{w}}"]
        for key, label in Memory.ROWS:
            a, b = getattr(plans[False], key), getattr(plans[True], key)
            if key in ("weight_copies", "gathered") and not (a or b):
                continue
            lines.append(f"{indent}{label:<26} {human_bytes(a):>{w}}   {human_bytes(b):>{w}}")
        tokens = self.setting.batch * self.setting.context
        per_token = [human_bytes(self.acts.total(c) / tokens) for c in plans]
        lines.append(f"{indent}{'activations per token':<26} {per_token[0]:>{w}}   {per_token[1]:>{w}}")
        return "\n".join(lines)


def plan(spec: ModelSpec, setting: Setting | None = None) -> Plan:
    """The plan of ``spec`` for ``setting`` (default: one sequence of its context_length, fp32, AdamW)."""
    setting = setting or Setting(context=spec.context_length)
    if setting.precision not in DTYPE_BYTES:
        raise ValueError(f"unknown precision '{setting.precision}' (choose from {', '.join(DTYPE_BYTES)})")
    return Plan(spec=spec, setting=setting, params=param_report(spec), flops=flops(spec, setting.context),
                acts=activations(spec, setting.context, setting.batch, setting.precision, setting.device))


def human_bytes(n: float) -> str:
    """``1.50 GiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 1e6 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def human_count(n: float) -> str:
    """``5.13 B``, ``124.4 M`` (parameters: thousands K, millions M, billions B, trillions T)."""
    return _scaled(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)), "")


def human_flops(n: float) -> str:
    """``12.3 GFLOP`` (decimal prefixes)."""
    return _scaled(n, (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)), "FLOP")


def _scaled(n: float, units, suffix: str) -> str:
    for prefix, size in units:
        if abs(n) >= size:
            return f"{n / size:.3g} {prefix}{suffix}" if abs(n) < 100 * size else f"{n / size:,.1f} {prefix}{suffix}"
    return f"{n:g} {suffix}".rstrip()
