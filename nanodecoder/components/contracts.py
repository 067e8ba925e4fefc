"""What a kind of each model category tells the rest of the framework: one base ``Spec`` class per category.

A kind's ``Spec`` derives from its category's contract below (``NormKind``, ``PositionalKind``,
``AttentionKind``, ``MLPKind``, ``RouterKind``).  The contract names what the planner (``model/plan.py``: parameter
counts, FLOPs, activation memory, KV cache), the optimizer (roles, from the category) and the builder ask of any
kind, and gives a default wherever one is right for every kind; what has no sensible default is ``REQUIRED`` and
checked when the kind is registered (``config.registry.Registry.add``), so a kind that leaves it out is refused at
once instead of being planned wrong.  The conformance suite (``tests/components/test_conformance.py``) checks
every registered kind's answers against what its module really does: weights against a meta build, saved bytes
against autograd's saved tensors, KV decoding against the full forward.

Sizes in bytes: ``c`` is the compute dtype's size (4 fp32, 2 bf16/fp16), ``device`` the kernels' device type
(``"cpu"`` or ``"cuda"``: some kernels keep different tensors there).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config.declare import Kind

FP32 = 4                     # bytes of an fp32 number
INDEX = 8                    # int64 token ids and routing indices
PROBE_WIDTH = 8              # the norm probes' width (NormKind.saved_bytes_per_token)


def dropout_mask(dtype_bytes: int, device: str) -> int:
    """Bytes of a dropout mask per element: a bool on CUDA, the input's dtype on the CPU."""
    return dtype_bytes if device == "cpu" else 1


def mean_keys(context: int, window: int | None) -> float:
    """Keys a query attends on average over positions 0..context-1 (causal: t + 1, at most ``window``)."""
    if window is None or window >= context:
        return (context + 1) / 2
    return (window * (window + 1) / 2 + (context - window) * window) / context


def saved_storages(fn, x: torch.Tensor, skip=()) -> tuple[dict[int, int], torch.Tensor]:
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


class Contract(Kind):
    """Base of the category contracts: ``REQUIRED`` lists what a kind's Spec must provide itself."""
    REQUIRED: ClassVar[tuple[str, ...]] = ("n_params",)
    #: tiny configurations of this kind (its YAML parameters, beside ``kind``) that the conformance suite builds
    #: in a model, one per path worth checking; ``{}`` (the defaults) where every parameter has one
    EXAMPLES: ClassVar[tuple[dict, ...]] = ({},)
    #: settings of the enclosing section the examples need (e.g. a top-1 router's MoE has ``top_k: 1``)
    HOST: ClassVar[dict] = {}

    @classmethod
    def missing(cls, spec_cls: type) -> list[str]:
        """What ``spec_cls`` (a kind's Spec) lacks of this contract: the base itself, or a required name."""
        if not (isinstance(spec_cls, type) and issubclass(spec_cls, cls)):
            return [f"a Spec deriving from {cls.__module__}.{cls.__name__}"]
        return [name for name in cls.REQUIRED if not _provides(spec_cls, name, cls)]


def _provides(spec_cls: type, name: str, contract: type) -> bool:
    """``spec_cls`` has ``name`` of its own: a declared field (a required one has no class attribute), or a class
    attribute, property or method other than the contract's placeholder (which only documents it)."""
    if name in {f.name for f in dataclasses.fields(spec_cls)}:
        return True
    placeholder = getattr(contract, name, _NONE)
    return getattr(spec_cls, name, _NONE) is not _NONE and getattr(spec_cls, name) is not placeholder


_NONE = object()


# ---------------------------------------------------------------------------------------------------- norm
class NormKind(Contract):
    """A norm over the last dimension, ``dim`` wide (every one of its parameters has the optimizer role
    ``norm``).  ``REQUIRED``: ``n_params`` and ``dim``."""
    REQUIRED = ("n_params", "dim")

    def saved_bytes_per_token(self) -> float:
        """Bytes the norm saves for the backward per token (its input and statistics; not its output, which its
        consumer saves).  Default: measured on two tokens at widths 8 and 16 and extended to ``dim`` (the saved
        input grows with the width, statistics do not), so that no width, however large, is ever allocated."""
        narrow, wide = (_norm_probe(dataclasses.replace(self, dim=w)) for w in (PROBE_WIDTH, 2 * PROBE_WIDTH))
        return narrow + (wide - narrow) * (self.dim - PROBE_WIDTH) / PROBE_WIDTH


@functools.lru_cache(maxsize=None)
def _norm_probe(norm: NormKind) -> float:
    module = norm.build()
    tokens = 2
    seen, out = saved_storages(module, torch.randn(tokens, norm.dim, requires_grad=True),
                               skip=list(module.parameters()))
    seen.pop(out.untyped_storage().data_ptr(), None)
    return sum(seen.values()) / tokens


# ---------------------------------------------------------------------------------------------------- positional
class PositionalKind(Contract):
    """A positional encoding: ``embed(pos)`` added to the input and/or ``rotary(pos)`` handed to attention."""
    #: whether it rotates q and k (RoPE): every layer's attention then needs an even ``rotary_size``, the same
    #: everywhere, and rotated q and k are new tensors the attention keeps
    rotates_heads: ClassVar[bool] = False
    #: whether ``embed(pos)`` adds to the input (learned positions): such a kind is only ever the model's
    #: ``positional``, never a block's or an override's (the input is embedded once, before every layer)
    additive: ClassVar[bool] = False


# ---------------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttentionBytes:
    """What one attention layer saves for the backward."""
    per_token: float      # numbers that scale with the tokens (its input included)
    per_sequence: float   # [T, S] terms of one sequence (probabilities)
    per_batch: float      # [T, S] masks, one per layer and micro-batch


class AttentionKind(Contract):
    """An attention layer ``forward(x, rotary, cache) -> y`` with ``new_cache(batch, max_len, device, dtype)``.

    ``REQUIRED``: ``n_params``; ``cache_width`` (numbers its KV cache keeps per position); ``saved_bytes`` (see
    below); and, unless it overrides ``score_flops``, ``n_heads``, ``score_dim`` and ``value_dim``.
    """
    REQUIRED = ("n_params", "cache_width", "saved_bytes")
    #: keys a query sees at most (null: every earlier one); bounds the cache, the FLOPs and the saved bytes
    window: ClassVar[int | None] = None
    #: for RoPE: dimensions per head that are rotated, and ``(key to blame, how it comes about, the fix)``
    rotary_size: ClassVar[int | None] = None
    rotary_origin: ClassVar[tuple[str, str, str] | None] = None
    #: numbers per position of the values a value embedding adds to (``model.value_embeddings``: its forward then
    #: takes ``values``, a function of its [B, T, value_width] values); None: the kind takes none
    value_width: ClassVar[int | None] = None

    @classmethod
    def missing(cls, spec_cls: type) -> list[str]:
        out = super().missing(spec_cls)
        if out and out[0].startswith("a Spec"):
            return out
        if spec_cls.score_flops is AttentionKind.score_flops:
            lacking = [n for n in ("n_heads", "score_dim", "value_dim") if not _provides(spec_cls, n, cls)]
            out += [f"{', '.join(lacking)} (or its own score_flops)"] if lacking else []
        return out

    @property
    def matmul_params(self) -> float:
        """Weights each token multiplies (2 FLOPs each); default: all of them."""
        return self.n_params

    def score_flops(self, context: int) -> float:
        """Forward FLOPs per token of the scores and the weighted values at ``context`` tokens (causal: position
        t sees t + 1 keys, at most ``window``)."""
        return 2 * self.n_heads * (self.score_dim + self.value_dim) * mean_keys(context, self.window)

    def cache_positions(self, context: int) -> int:
        """Positions its KV cache holds for a sequence of ``context`` tokens."""
        return min(context, self.window or context)

    def saved_bytes(self, T: int, c: int, device: str, rotates: bool) -> AttentionBytes:  # pragma: no cover
        """What the layer saves for the backward for a sequence of ``T`` tokens, its input included
        (``rotates``: the model's positional encoding rotates q and k)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- mlp
class MLPKind(Contract):
    """A feed-forward layer ``forward(x) -> (y, aux)`` (dense, or an MoE with a router and experts).

    ``REQUIRED``: ``n_params``, ``dim`` and ``saved_bytes_per_token``."""
    REQUIRED = ("n_params", "dim", "saved_bytes_per_token")
    #: whether an MoE may name this kind as its ``expert_kind`` (every kind but an MoE itself)
    expert_capable: ClassVar[bool] = True

    @property
    def n_active(self) -> float:
        """Parameters one token uses (an MoE counts top_k of its routed experts); default: all."""
        return self.n_params

    @property
    def router_params(self) -> float:
        """Parameters of a router (fp32 maths: never cast by autocast, no matmul FLOPs counted as weights)."""
        return 0

    @property
    def expert_params(self) -> float:
        """Parameters of experts, which are cast with an explicit ``.to`` (not cached by autocast)."""
        return 0

    def saved_bytes_per_token(self, c: int, device: str) -> float:  # pragma: no cover
        """Bytes the layer saves for the backward per token, its input included."""
        raise NotImplementedError

    def saved_bytes_per_batch(self, c: int, device: str) -> float:
        """Bytes saved once per layer and micro-batch, whatever its size (an expert loop's padding rows)."""
        return 0.0


# ---------------------------------------------------------------------------------------------------- router
class RouterKind(Contract):
    """An MoE router ``forward(x [N, D]) -> RouterOutput`` over ``n_experts`` (role ``router``, fp32 maths)."""
    REQUIRED = ("n_params", "dim", "n_experts")

    def saved_bytes_per_token(self) -> float:
        """Bytes it saves per token: its fp32 input, logits and probabilities (default)."""
        return self.dim * FP32 + 2 * self.n_experts * FP32


# ---------------------------------------------------------------------------------------------------- rope_scaling
class RopeScalingKind(Contract):
    """A RoPE frequency scaling: ``scale(inv_freq, theta, dim) -> inv_freq``, and the factors it puts on cos and
    sin (``attention_factor``) and on the softmax scale (``softmax_factor``), 1 by default.  No weights."""
    REQUIRED = ("scale",)
    n_params: ClassVar[int] = 0
    attention_factor: ClassVar[float] = 1.0
    softmax_factor: ClassVar[float] = 1.0


# ---------------------------------------------------------------------------------------------------- init
class InitKind(Contract):
    """A weight initialisation: ``fill(t, fan_in, *, residual, expert, embedding)`` fills one tensor in place
    (``components.init.init_model`` walks the model; a component with special needs has ``init_weights``)."""
    REQUIRED = ("fill",)
    n_params: ClassVar[int] = 0


#: the contract of each model category (``components.register`` puts them on the catalog's registries)
CONTRACTS = {"norm": NormKind, "positional": PositionalKind, "attention": AttentionKind, "mlp": MLPKind,
             "router": RouterKind, "rope_scaling": RopeScalingKind, "init": InitKind}
