"""Plan a model from its spec alone: parameters, FLOPs and memory, before anything is built.

Nothing here builds the model: every number is arithmetic on the :class:`ModelSpec`
(plus two probes on a few hundred numbers: ``NormKind.saved_bytes_per_token`` and
``mlp.activation_units``), summed over its distinct blocks (``ModelSpec.layer_groups``), not
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
    activation functions, softmax, bias additions (well under 1%), value-embedding lookups
    and U-Net skip additions.  Each MTP module k (``model.mtp``) runs on the first
    context - k positions: its projection, block and the head, times (context - k) / context
    (its projection counted with the blocks, so also in ``recompute``, a slight over-count).

Memory (bytes; per device: FSDP shards the model state over ``world_size``; expert parallelism splits the
routed experts of every MoE layer over ``expert_parallel`` devices, the rest replicated under DDP or sharded
under FSDP: :meth:`Plan.params_per_device`)
    weights and gradients in fp32 (the runtime keeps fp32 master weights under every
    precision); optimizer state = its fp32 states per parameter (AdamW: 2); under
    bf16/fp16 autocast a 2-byte copy of every matmul weight, made by the casts and kept
    for the backward; activations = what autograd saves for the backward, tensor by
    tensor as each kind reports it (its contract, ``components/contracts.py``; see :func:`block_bytes`), deduplicated by
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
from dataclasses import dataclass

from ..components.contracts import FP32, INDEX, dropout_mask
from .block import NORMS
from .params import ParamReport, Row
from .spec import ModelSpec

#: bytes of one number in each precision's compute dtype ('mixed': bf16 or fp16, two bytes either way)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 2}


# ---------------------------------------------------------------------------------------- parameters
def param_report(spec: ModelSpec) -> ParamReport:
    """Parameters by component from the spec alone, in the rows and names of ``count_params``."""
    rows: dict[str, list[float]] = {}

    def add(name: str, count: float, active: float | None = None) -> None:
        row = rows.setdefault(name, [0, 0.0])
        row[0] += count
        row[1] += count if active is None else active

    def add_block(b, n: int, prefix: str = "") -> None:
        add(f"{prefix}norm ({b.norm.kind})", n * len(NORMS[spec.norm_placement]) * b.norm.n_params)
        add(f"{prefix}attention ({b.attention.kind})", n * b.attention.n_params)
        add(f"{prefix}mlp ({b.mlp.kind})", n * b.mlp.n_params, n * b.mlp.n_active)

    embedding = spec.vocab_size * spec.d_model + spec.positional.n_params
    add("token embedding", spec.vocab_size * spec.d_model)
    add(f"positional ({spec.positional.kind})", spec.positional.n_params)
    for b, n in spec.layer_groups:
        add_block(b, n)
        if b.value_embedding:                     # a table and its two mixing scalars per layer
            add("value embeddings", n * (spec.vocab_size * b.attention.value_width + 2))
            embedding += n * (spec.vocab_size * b.attention.value_width + 2)
    add(f"final norm ({spec.final.kind})", spec.final.n_params)
    head = "output head (tied)" if spec.tie_embeddings else "output head (untied)"
    add(head, 0 if spec.tie_embeddings else spec.vocab_size * spec.d_model)
    if spec.unet_skips is not None:
        add("skip weights (unet)", len(spec.unet_skips.indices(spec.n_layers)))
    if spec.mtp is not None:                      # each module; the embedding and the head are the model's
        D = spec.mtp.depth
        add(f"mtp norm ({spec.final.kind})", D * 3 * spec.final.n_params)
        add("mtp projection", D * 2 * spec.d_model * spec.d_model)
        add_block(spec.mtp_block, D, "mtp ")
    out = [Row(name, int(c), a) for name, (c, a) in rows.items() if c or name == head]
    return ParamReport(total=sum(r.count for r in out), active=int(round(sum(r.active for r in out))),
                       embedding=embedding, rows=out)


# ---------------------------------------------------------------------------------------- FLOPs
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
        matmuls += 2 * n * (b.attention.matmul_params + b.mlp.n_active)
        attention += n * b.attention.score_flops(T)
    head = 2.0 * spec.d_model * spec.vocab_size
    if spec.mtp is not None:        # module k runs on the first T - k positions: its projection, block and head
        b, D = spec.mtp_block, spec.d_model
        for k in range(1, min(spec.mtp.depth, T - 1) + 1):
            share = (T - k) / T
            matmuls += 2 * share * (2 * D * D + b.attention.matmul_params + b.mlp.n_active)
            attention += share * b.attention.score_flops(T - k)
            head += share * 2.0 * D * spec.vocab_size
    return Flops(block_matmuls=matmuls, head=head, attention=attention)


def flops_per_token(spec_or_model, context_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of a ModelSpec or a built model (its spec; nothing is run)."""
    spec = spec_or_model if isinstance(spec_or_model, ModelSpec) else spec_or_model.spec
    return flops(spec, context_length).training


# ---------------------------------------------------------------------------------------- activations
def block_bytes(spec: ModelSpec, b, T: int, c: int, device: str) -> tuple[float, float]:
    """``(bytes per sequence, bytes per micro-batch)`` one block saves for the backward: its norms (each keeps
    its input), the attention and the MLP (each keeps its input: a norm's output, in the compute dtype)."""
    a = b.attention.saved_bytes(T, c, device, b.positional.rotates_heads)
    norms = len(NORMS[spec.norm_placement]) * b.norm.saved_bytes_per_token()
    # a value embedding: the looked-up values and the mixed ones, in the values' dtype (fp32 on the CPU kernels)
    values = 2 * b.attention.value_width * (FP32 if device == "cpu" else c) if b.value_embedding else 0
    return (T * (norms + a.per_token + b.mlp.saved_bytes_per_token(c, device) + values) + a.per_sequence,
            a.per_batch + b.mlp.saved_bytes_per_batch(c, device))


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch, by part."""
    embedding: float      # token ids (+ the embedding dropout's mask)
    blocks: float         # every block's saved tensors
    head: float           # final norm, head input, fp32 log-probabilities (+ soft-capped logits)
    logits: float         # the logits the caller holds and the fp32 loss gradient at the start of the backward
    block_inputs: float   # with checkpointing: the input of every block, fp32
    largest_block: float  # with checkpointing: one block recomputed
    skips: float = 0.0    # model.unet_skips: sent outputs that no block keeps as its input
    mtp: float = 0.0      # model.mtp: every module's embeddings, projection input, block, norm, head and logits

    @property
    def saved(self) -> float:
        """What autograd saves without checkpointing (the saved_tensors_hooks measurement)."""
        return self.embedding + self.blocks + self.head + self.skips + self.mtp

    def total(self, checkpointing: bool) -> float:
        inner = self.block_inputs + self.largest_block if checkpointing else self.blocks
        return self.embedding + inner + self.head + self.logits + self.skips + self.mtp


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
    head_per_token = spec.final.saved_bytes_per_token() + D * c + V * FP32 + softcap
    dropped = D * dropout_mask(FP32, device) if spec.dropout else 0
    skips = 0.0
    if spec.unet_skips is not None:     # a sent output is kept by its skip; the next block's input unless it receives
        sources = spec.unet_skips.indices(spec.n_layers)
        skips = tokens * D * FP32 * sum(spec.n_layers - 2 - i in sources for i in sources)
    mtp = 0.0
    if spec.mtp is not None:    # module k on T - k positions: its two norms (of copies), projection input, block,
        for k in range(1, min(spec.mtp.depth, T - 1) + 1):         # head and targets (a copy: a slice)
            seq, once = block_bytes(spec, spec.mtp_block, T - k, c, device)
            # the two norms (as measured: a final norm's bytes each, less one fp32 row for the embeddings')
            norms = 2 * spec.final.saved_bytes_per_token() - D * FP32
            mtp += batch * (seq + (T - k) * (norms + 2 * D * c + head_per_token + INDEX)) + once
    return Activations(embedding=tokens * (INDEX + dropped), blocks=sum(b * n for b, n in per_block),
                       head=tokens * head_per_token, logits=tokens * V * (c + FP32),
                       block_inputs=tokens * D * FP32 * spec.n_layers, largest_block=max(b for b, _ in per_block),
                       skips=skips, mtp=mtp)


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
    expert_parallel: int = 1       # GPUs each MoE layer's experts are split over (FSDP gathers 1/ep of them)
    checkpointing: bool = False    # the run's choice (both plans are computed)
    device: str = "cuda"           # the kernels' device ("cpu": dropout masks as wide as their input, ...)

    def describe(self) -> str:
        ranks = (f", {'FSDP' if self.sharded else 'DDP'} over {self.world_size} devices"
                 if self.world_size > 1 else "")
        if self.expert_parallel > 1:
            ranks += f", experts split over {self.expert_parallel} devices"
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
    gathered: float           # FSDP: the root's and two blocks' unsharded weights, two blocks' gradients
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
        return sum(n * b.attention.cache_width * b.attention.cache_positions(T)
                   for b, n in self.spec.layer_groups) * self.compute_bytes

    @property
    def shards(self) -> int:
        """Devices the model state is split over (FSDP: world_size; DDP: 1, a replica each)."""
        return self.setting.world_size if self.setting.sharded else 1

    @property
    def expert_split(self) -> int:
        """Devices each routed expert's state is split over: its layer's experts over ``expert_parallel`` devices,
        or FSDP's shards where those are more (the experts of a rank sharded over the other ``fsdp / ep``)."""
        return max(self.shards, self.setting.expert_parallel)

    def local(self, params: float, routed: float) -> float:
        """What one device holds of ``params`` parameters of which ``routed`` are routed experts."""
        return (params - routed) / self.shards + routed / self.expert_split

    @property
    def routed_params(self) -> float:
        """Parameters of routed experts, every layer (what expert parallelism splits)."""
        return sum(n * routed_params(b.mlp) for b, n in block_groups(self.spec))

    @property
    def params_per_device(self) -> float:
        """Parameters one device holds (each has its gradient and optimizer state): the routed experts over
        :attr:`expert_split` devices, the rest over :attr:`shards`."""
        return self.local(self.params.total, self.routed_params)

    def memory(self, checkpointing: bool | None = None) -> Memory:
        """Per-device bytes of a training step (``checkpointing``: default the setting's)."""
        st, spec = self.setting, self.spec
        checkpointing = st.checkpointing if checkpointing is None else checkpointing
        P, held = self.params.total, self.params_per_device
        head = spec.vocab_size * spec.d_model
        groups = block_groups(spec)
        blocks = [(b.attention.n_params + b.mlp.n_params, n) for b, n in groups]      # (one block's, layers)
        # what FSDP gathers of one block: its routed experts split over expert_parallel devices
        gathered_block = max(w - routed_params(b.mlp) * (1 - 1 / st.expert_parallel) for (w, _), (b, _)
                             in zip(blocks, groups))
        matmul = sum(n * (b.attention.n_params + b.mlp.n_params - b.mlp.router_params) for b, n in groups) + head
        if spec.mtp is not None:          # each module's projection (its block is one of the groups)
            matmul += spec.mtp.depth * 2 * spec.d_model ** 2
        copies = 0.0
        if DTYPE_BYTES[st.precision] < FP32:
            if checkpointing:        # the experts' casts are not cached: one block's at a time
                all_experts = sum(n * b.mlp.expert_params for b, n in groups)
                one_block = max(self.local(b.mlp.expert_params, routed_params(b.mlp)) for b, _ in groups)
                cast = (matmul - all_experts) / self.shards + one_block
            else:
                cast = self.local(matmul, self.routed_params)
            copies = DTYPE_BYTES[st.precision] * cast
        gathered = 0.0
        if st.sharded and st.world_size > 1:
            root = P - sum(w * n for w, n in blocks) - sum(n * block_norm_params(spec, b) for b, n in groups)
            # in the backward: two blocks' gathered weights (the current one and the prefetched next), the
            # current block's unsharded gradients, and the previous block's reduce-scatter input (a copy of its
            # gradients until the collective ends); measured by phase on 4 gloo processes, FSDP2, torch 2.13
            gathered = FP32 * (root + 4 * gathered_block)
        return Memory(weights=FP32 * held, gradients=FP32 * held, optimizer=FP32 * st.optimizer_states * held,
                      weight_copies=copies, gathered=gathered, activations=self.acts.total(checkpointing))

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


def block_norm_params(spec: ModelSpec, b) -> int:
    """The parameters of one block's norms (with the block in FSDP's unit, not in the root)."""
    return len(NORMS[spec.norm_placement]) * b.norm.n_params


def routed_params(mlp) -> float:
    """Parameters of an MLP's routed experts (a MoE's ``routed_params``; none for a dense kind or shared experts)."""
    return getattr(mlp, "routed_params", 0) if mlp.expert_params else 0


def block_groups(spec: ModelSpec) -> list[tuple]:
    """``(block, count)`` of every transformer block: the layers' and each MTP module's (``model.mtp``): the units
    FSDP wraps one by one and whose experts expert parallelism splits (the runtime finds both as ``Block``)."""
    groups = list(spec.layer_groups)
    if spec.mtp is not None:
        groups.append((spec.mtp_block, spec.mtp.depth))
    return groups


def plan(spec: ModelSpec, setting: Setting | None = None) -> Plan:
    """The plan of ``spec`` for ``setting`` (default: one sequence of its context_length, fp32, AdamW)."""
    setting = setting or Setting(context=spec.context_length)
    if setting.precision not in DTYPE_BYTES:
        raise ValueError(f"unknown precision '{setting.precision}' (choose from {', '.join(DTYPE_BYTES)})")
    problem = expert_layout_problem(spec, setting.expert_parallel, setting.world_size)
    if problem:
        raise ValueError(f"runtime.expert_parallel: {problem}")
    return Plan(spec=spec, setting=setting, params=param_report(spec), flops=flops(spec, setting.context),
                acts=activations(spec, setting.context, setting.batch, setting.precision, setting.device))


def expert_counts(spec: ModelSpec) -> set[int]:
    """The expert counts of the model's MoE layers (empty for a dense model)."""
    return {b.mlp.n_experts for b, _ in block_groups(spec) if b.mlp.expert_params}


def expert_parallel_degrees(spec: ModelSpec, world_size: int) -> list[int]:
    """The expert-parallel degrees ``world_size`` processes and every MoE layer's experts allow (``[1]``: dense)."""
    counts = expert_counts(spec)
    return [n for n in range(1, world_size + 1) if _splits(counts, n, world_size) and (counts or n == 1)]


def _splits(counts: set[int], ep: int, world_size: int) -> bool:
    return world_size % ep == 0 and all(n % ep == 0 for n in counts)


def expert_layout_problem(spec: ModelSpec, ep: int, world_size: int) -> str | None:
    """Why ``ep``-way expert parallelism over ``world_size`` processes does not fit ``spec`` (None: it does): the
    one rule of the planner, the cluster planner and the run's preflight (``ExpertParallelExperts`` checks its
    own layer again at build)."""
    counts = expert_counts(spec)
    if ep == 1 or _splits(counts, ep, world_size):
        return None
    return (f"{ep} must divide the number of processes ({world_size}) and every MoE layer's n_experts "
            f"({', '.join(map(str, sorted(counts)))}); choose one of {expert_parallel_degrees(spec, world_size)}")


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
