"""The ``model:`` section, declared: the architecture as frozen, typed specs.

Every parameter is declared once here or in its component's ``Spec``;
derived values (the per-layer blocks after overrides, the vocabulary after
padding) are properties computed here and only here; parameter counts, FLOPs
and memory are computed from these specs in ``model.plan``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

from ..components import model_catalog
from ..config.declare import Kind, _lookup, build, choice, declared, param, params, round_up
from ..config.registry import Catalog


@declared
class LayerRange:
    """Every N-th layer from start, stop excluded."""
    start: int = param(0, doc="First layer.", minimum=0)
    stop: int | None = param(None, doc="Stop before this layer (null: after the last layer).", minimum=0)
    every: int = param(1, doc="Take every N-th layer from start.", minimum=1)

    def indices(self, n_layers: int) -> list[int]:
        return list(range(self.start, n_layers if self.stop is None else self.stop, self.every))


@declared
class BlockSpec:
    """The parts of one transformer block: its norms (where they sit is the model's ``norm_placement``), attention
    and MLP, each on a residual branch."""
    norm: Kind = choice("norm", default="layernorm", doc="The norm kind of every norm of the block (before and/or "
                                                         "after attention and the MLP: model.norm_placement).")
    attention: Kind = choice("attention", doc="The attention layer.")
    mlp: Kind = choice("mlp", doc="The feed-forward layer (dense or moe).")
    #: not a YAML key: the positional encoding this layer's attention uses, set in ``ModelSpec.blocks`` (the model's
    #: ``positional`` or an override's, its hand-downs taken from this block); null in ``model.block``
    positional: Kind | None = None
    #: not a YAML key: whether this layer's attention mixes a value embedding into its values
    #: (``model.value_embeddings``), set in ``ModelSpec.blocks``
    value_embedding: bool = False


PARTS = ("norm", "attention", "mlp", "positional")
_LAYERS_DOC = "a list of indices ([0, 1]) or a range {start, stop, every} (every N-th layer from start, stop excluded)"


@declared
class ValueEmbeddingSpec:
    """Value embeddings (modded-nanogpt): each chosen layer has its own table of one value vector per token, added
    into its attention's values as ``v = a v + b ve[token]``, with two learned scalars a and b per layer (1 at the
    start; the table starts as an embedding does under model.init). The tables are embeddings (a lookup, no
    matmul): the AdamW part of Muon, counted in the embedding parameters."""
    layers: tuple[int, ...] | LayerRange | None = param(
        None, doc=f"Which layers have one: {_LAYERS_DOC}; null: every layer. Their attention kind must take value "
                  "embeddings (causal does).", minimum=0, min_items=1)

    def indices(self, n_layers: int) -> list[int]:
        return _chosen(self.layers, n_layers)


@declared
class UNetSkipSpec:
    """U-Net skips (modded-nanogpt): the output of each chosen early block i is added, times a learned scalar, to the
    input of block n_layers - 1 - i."""
    layers: tuple[int, ...] | LayerRange | None = param(
        None, doc=f"Which early blocks send their output: {_LAYERS_DOC}, each below n_layers - 1 - itself; null: "
                  "the first n_layers // 2.", minimum=0, min_items=1)
    weight: float = param(1.0, doc="Starting value of every skip's learned scalar.")

    def indices(self, n_layers: int) -> list[int]:
        return _chosen(self.layers, n_layers, default=n_layers // 2)


@declared
class MTPSpec:
    """Multi-token prediction (DeepSeek-V3, section 2.2): D sequential modules after the model; module k combines
    norm(h_i of module k-1, the model's last block output for k = 1) and norm(Emb(t_{i+k})) by a projection
    M_k [d_model, 2 d_model], runs them through one transformer block and predicts t_{i+k+1} through its own final
    norm and the model's output head (the token embedding and the head are the model's, shared). The norms are the
    model's final norm kind. Training adds loss_weight / depth x the sum of the modules' cross-entropies to the
    loss (the reported loss stays the next-token one); generation does not use the modules."""
    depth: int = param(1, doc="Number of modules D: module k predicts the token k + 1 positions ahead (DeepSeek-V3: "
                              "1).", minimum=1)
    loss_weight: float = param(0.3, doc="lambda, the weight of the modules' mean cross-entropy in the training "
                                        "loss (DeepSeek-V3: 0.3, then 0.1 for its last 4.8T tokens).", minimum=0)
    block: BlockSpec | None = param(None, doc="The block of every module (null: the model's last layer's, "
                                              "overrides included, as DeepSeek-V3 has).")


@declared
class OverrideSpec:
    """Replace block parts in chosen layers; later overrides win."""
    layers: tuple[int, ...] | LayerRange = param(
        doc="Which layers this override applies to: a list of indices ([0, 1]) or a range {start, stop, every} "
            "(every N-th layer from start, stop excluded).", minimum=0, min_items=1)
    norm: Kind | None = choice("norm", default=None, doc="Norm for these layers (replaces the whole norm block).")
    attention: Kind | None = choice("attention", default=None,
                                    doc="Attention for these layers (replaces the whole block).")
    mlp: Kind | None = choice("mlp", default=None, doc="MLP for these layers (replaces the whole block).")
    positional: Kind | None = choice(
        "positional", default=None, doc="Positional encoding of these layers' attention (null: model.positional), "
                                        "e.g. none for Llama 4's NoPE layers, or rope at another theta or scaling "
                                        "(Gemma 3's global layers); not learned, which is added to the input once.")

    def indices(self, n_layers: int) -> list[int]:
        return list(self.layers) if isinstance(self.layers, tuple) else self.layers.indices(n_layers)

    def parts(self) -> dict[str, Kind]:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def check(self):
        if self.positional is not None and self.positional.additive:
            kind = self.positional.kind
            yield ("positional",), (f"{kind} positions are added to the input once, before the first layer, so only "
                                    f"model.positional may be {kind}; give these layers rope or none, or make "
                                    f"model.positional {kind}")


def _chosen(layers, n_layers: int, default: int | None = None) -> list[int]:
    """The indices a ``layers`` value chooses (null: every layer, or the first ``default``), those past the last
    layer left out (the model's check reports them)."""
    if layers is None:
        return list(range(n_layers if default is None else default))
    if isinstance(layers, tuple):
        return [i for i in layers if i < n_layers]
    return layers.indices(n_layers)


def layer_coverage(overrides: tuple[OverrideSpec, ...], n_layers: int) -> dict[tuple[int, ...], int]:
    """``{indices of the overrides that cover a layer: how many layers they cover}`` over layers 0..n_layers-1,
    keys in the order of their first layer, without visiting every layer.

    The layers are cut at every range's start and stop and around every listed layer; between two cuts the
    ranges that reach a layer stay the same, and which of them select it repeats with the least common multiple
    of their ``every``: one period is visited (or the whole stretch, where it is shorter), each position
    standing for the layers a period apart.  Shipped blueprints have periods of 1 or 2; only ranges with large
    ``every`` without common factors overlapping over millions of layers would visit that many positions."""
    listed: dict[int, set[int]] = {}
    ranges = []                                         # (override, start, stop, every)
    for j, ov in enumerate(overrides):
        if isinstance(ov.layers, tuple):
            for i in ov.layers:
                if 0 <= i < n_layers:
                    listed.setdefault(i, set()).add(j)
        else:
            r = ov.layers
            stop = n_layers if r.stop is None else min(r.stop, n_layers)
            if r.start < stop:
                ranges.append((j, r.start, stop, r.every))
    cuts = sorted({0, n_layers, *(x for _, start, stop, _ in ranges for x in (start, stop)),
                   *(x for i in listed for x in (i, i + 1))})
    out: dict[tuple[int, ...], int] = {}
    for a, b in zip(cuts, cuts[1:]):
        active = [(j, start, every) for j, start, stop, every in ranges if start <= a and b <= stop]
        period = math.lcm(*(every for _, _, every in active))
        for i in range(a, a + min(period, b - a)):
            covering = listed.get(i, set()) | {j for j, start, every in active if (i - start) % every == 0}
            key = tuple(sorted(covering))
            out[key] = out.get(key, 0) + len(range(i, b, period))
    return out


#: the most bytes one tensor can have: torch counts a storage's bytes in a signed 64-bit integer ("Storage size
#: calculation overflowed" beyond), which is also half of a 64-bit address space
MAX_TENSOR_BYTES = 2 ** 63 - 1
WEIGHT_BYTES = 4                     # weights are fp32 under every precision
_beyond = "past the 2**63 - 1 bytes torch can index (no machine can build it)"


def _layers_word(n: int) -> str:
    return f"the model has {n} layer{'s' if n != 1 else ''} (0..{n - 1})"


@declared
class ModelSpec:
    """The model architecture."""
    vocab_size: int | Literal["auto"] = param("auto", doc="Vocabulary size, or 'auto' to take it from the "
                                                          "tokenizer.", minimum=1)
    pad_vocab_to: int = param(1, doc="Round the vocabulary up to a multiple of this (nanoGPT pads 50257 to "
                                     "50304 for speed).", minimum=1)
    context_length: int = param(doc="Maximum sequence length (tokens).", minimum=1)
    d_model: int = param(doc="Width of the residual stream.", minimum=1)
    n_layers: int = param(doc="Number of transformer blocks.", minimum=1)
    dropout: float = param(0.0, doc="Dropout on embeddings and residual branches.", minimum=0, maximum=1)
    tie_embeddings: bool = param(True, doc="Share the token embedding with the output head.")
    embed_scale: bool = param(False, doc="Multiply the token embeddings by sqrt(d_model) (Gemma).")
    norm_placement: Literal["pre", "post", "sandwich"] = param(
        "pre", doc="Where each block's norms sit: pre (before attention and the MLP: GPT-2, LLaMA), post (after "
                   "each residual add: the original Transformer), sandwich (before and after each sub-layer, inside "
                   "the residual: Gemma 2); every norm is the block's norm kind.")
    logit_softcap: float | None = param(None, doc="Soft-cap the output logits: cap * tanh(logits / cap) (Gemma 2: "
                                                  "30); null: off.", exclusive_minimum=0)
    block: BlockSpec = param(doc="The block used in every layer unless an override says otherwise.")
    overrides: tuple[OverrideSpec, ...] = param(
        (), doc="Per-layer variations, e.g. MoE every 2nd layer or the first layer dense.")
    positional: Kind = choice("positional", default="learned", doc="Positional encoding of every layer unless an "
                                                                   "override gives its layers their own.")
    final_norm: Kind | None = choice("norm", default=None, doc="Norm before the output head (null: the block "
                                                               "norm).")
    init: Kind = choice("init", default="gpt2", doc="Weight initialisation scheme.")
    value_embeddings: ValueEmbeddingSpec | None = param(
        None, doc="Value embeddings in chosen layers (modded-nanogpt), e.g. {layers: [0, 1]}; {}: every layer; "
                  "null: off.")
    unet_skips: UNetSkipSpec | None = param(
        None, doc="U-Net skips from early to late blocks (modded-nanogpt), e.g. {} (the first half into the "
                  "second); null: off.")
    mtp: MTPSpec | None = param(None, doc="Multi-token prediction modules (DeepSeek-V3), e.g. {depth: 1}; a "
                                          "training objective only; null: off.")

    @functools.cached_property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """The block of every layer, overrides applied in order (what the builder builds; the plan sums over
        :attr:`layer_groups` instead, which does not grow with n_layers)."""
        layers = [{**{p: getattr(self.block, p) for p in PARTS}, "value_embedding": False}
                  for _ in range(self.n_layers)]
        for ov in self.overrides:
            for i in ov.indices(self.n_layers):
                if 0 <= i < self.n_layers:
                    layers[i].update(ov.parts())
        if self.value_embeddings is not None:
            for i in self.value_embeddings.indices(self.n_layers):
                layers[i]["value_embedding"] = True
        made: dict[tuple, BlockSpec] = {}             # layers of the same parts share one BlockSpec
        for parts in layers:
            key = tuple(parts.values())
            if key not in made:
                made[key] = self._layer_block(parts)
        return tuple(made[tuple(parts.values())] for parts in layers)

    @functools.cached_property
    def layer_groups(self) -> tuple[tuple[BlockSpec, int], ...]:
        """``(block, number of layers)`` for each combination of overrides some layer gets, in the order of their
        first layer: :attr:`blocks` counted without a per-layer list, so that planning 10**9 layers costs what
        planning 10 does."""
        groups = []
        n = len(self.overrides)
        # the value-embedding layers join as one more (partless) override: index n in a layer's covering
        extra = () if self.value_embeddings is None else \
            (OverrideSpec(layers=self.value_embeddings.layers or LayerRange()),)
        for covering, count in layer_coverage(self.overrides + extra, self.n_layers).items():
            parts = {**{p: getattr(self.block, p) for p in PARTS}, "value_embedding": n in covering}
            for j in covering:
                if j < n:
                    parts.update(self.overrides[j].parts())
            groups.append((self._layer_block(parts), count))
        return tuple(groups)

    @functools.cached_property
    def mtp_block(self) -> BlockSpec | None:
        """The block of every multi-token-prediction module (``mtp.block``, or the last layer's), or None."""
        if self.mtp is None:
            return None
        if self.mtp.block is not None:
            return self._layer_block({**{p: getattr(self.mtp.block, p) for p in PARTS}, "value_embedding": False})
        last = self.n_layers - 1
        parts = {**{p: getattr(self.block, p) for p in PARTS}, "value_embedding": False}
        for ov in self.overrides:
            chosen = ov.layers
            if (last in chosen) if isinstance(chosen, tuple) else \
                    (chosen.start <= last < (chosen.stop if chosen.stop is not None else last + 1)
                     and (last - chosen.start) % chosen.every == 0):
                parts.update(ov.parts())
        return self._layer_block(parts)

    def _layer_block(self, parts: dict) -> BlockSpec:
        """One layer's block from its parts: its positional (the model's where no override gives one) with the
        hand-downs taken from this block, so that RoPE's head_dim is this layer's attention's ``rotary_size`` (a
        positional is built where it is declared, inside model.positional or an override, before any layer's
        attention is known)."""
        block = BlockSpec(**{**parts, "positional": None})
        positional = parts["positional"] or self.positional
        ctx = {**{f.name: getattr(self, f.name) for f, _ in params(ModelSpec)}, "block": block}
        handed = {f.name: _lookup(ctx, f.metadata["context"] or f.name)
                  for f in dataclasses.fields(positional) if "context" in f.metadata}
        return dataclasses.replace(block, positional=dataclasses.replace(positional, **handed))

    @property
    def final(self) -> Kind:
        """The norm before the output head."""
        return self.final_norm if self.final_norm is not None else self.block.norm

    def with_vocab(self, tokenizer_vocab: int | None) -> "ModelSpec":
        """This spec with ``vocab_size`` an integer: the tokenizer's where it is ``auto``, padded
        (unchanged while it is ``auto`` and no tokenizer size is known: building the model then refuses)."""
        vocab = self.vocab_size
        if vocab == "auto":
            if tokenizer_vocab is None:
                return self
            vocab = tokenizer_vocab
        return dataclasses.replace(self, vocab_size=round_up(vocab, self.pad_vocab_to))

    def definitions(self):
        """``(relative path, BlockSpec or OverrideSpec)`` of every block written in the blueprint."""
        yield ("block",), self.block
        for j, ov in enumerate(self.overrides):
            yield ("overrides", j), ov

    def check(self):
        n = self.n_layers
        for j, ov in enumerate(self.overrides):
            at = ("overrides", j, "layers")
            if isinstance(ov.layers, tuple):
                for k, i in enumerate(ov.layers):
                    if i >= n:
                        yield at + (k,), f"layer {i} does not exist; {_layers_word(n)}"
                continue
            start, stop = ov.layers.start, ov.layers.stop
            if start >= n:
                yield at + ("start",), f"start {start} selects no layer; {_layers_word(n)}"
            elif stop is not None and stop > n:
                yield at + ("stop",), (f"stop {stop} is past the last layer; {_layers_word(n)} "
                                       "(stop: null goes to the end)")
            elif stop is not None and stop <= start:
                yield at + ("stop",), f"stop {stop} selects no layer; it must be greater than start ({start})"
        yield from self._trick_checks()
        yield from self._rotary_checks()
        yield from self._size_checks()

    def _trick_checks(self):
        """value_embeddings, unet_skips and mtp: the layers they name exist and can take them."""
        n = self.n_layers
        for key in ("value_embeddings", "unet_skips"):
            section = getattr(self, key)
            if section is None or not isinstance(section.layers, tuple):
                continue
            for k, i in enumerate(section.layers):
                if i >= n:
                    yield (key, "layers", k), f"layer {i} does not exist; {_layers_word(n)}"
        if self.value_embeddings is not None:
            for b, _ in self.layer_groups:
                if b.value_embedding and b.attention.value_width is None:
                    yield ("value_embeddings", "layers"), (
                        f"a layer it chooses has {b.attention.kind} attention, which takes no value embeddings; "
                        f"choose only layers whose attention does (causal)")
                    break
        if self.unet_skips is not None:
            late = [i for i in self.unet_skips.indices(n) if i >= n - 1 - i]
            if late:
                yield ("unet_skips", "layers"), (
                    f"layer {late[0]}'s output would go into layer {n - 1 - late[0]}, which is not after it; "
                    f"choose layers below {(n - 1) / 2:g} ({_layers_word(n)})")
            elif not self.unet_skips.indices(n):
                yield ("unet_skips", "layers"), f"no layer sends a skip; {_layers_word(n)}"
        if self.mtp is not None and self.mtp.depth >= self.context_length:
            yield ("mtp", "depth"), (f"depth {self.mtp.depth} leaves no position to predict from in "
                                     f"context_length {self.context_length}; lower it")

    def _size_checks(self):
        """Sizes no machine can build, as blueprint errors (a run that is merely too big for this machine is the
        memory plan's "does not fit" instead): weights that one torch tensor cannot hold."""
        def too_big(n: int) -> bool:
            return n * WEIGHT_BYTES > MAX_TENSOR_BYTES

        vocab = round_up(self.vocab_size, self.pad_vocab_to) if self.vocab_size != "auto" else 0
        if too_big(vocab * self.d_model):
            yield ("vocab_size",), (f"the token embedding would hold vocab_size x d_model = {vocab:,} x "
                                    f"{self.d_model:,} fp32 weights, {_beyond}; lower vocab_size or d_model")
        if too_big(self.positional.n_params):
            yield ("positional",), (f"{self.positional.kind} positions would hold {self.positional.n_params:,} fp32 "
                                    f"weights, {_beyond}; lower model.context_length or d_model")
        for at, definition in self.definitions():
            for part in PARTS:
                spec = getattr(definition, part)
                if spec is not None and too_big(spec.n_params):
                    yield at + (part,), (f"one layer's {spec.kind} {part} would hold {spec.n_params:,} fp32 weights, "
                                         f"{_beyond}; lower model.d_model or this layer's sizes")

    def _pairings(self) -> list[tuple[tuple, tuple]]:
        """``(where the attention is defined, where the positional is)`` of every pairing some layer has, relative
        paths (``("block",)`` / ``("overrides", j)``; ``("positional",)`` / ``("overrides", j, "positional")``),
        ordered by the attention's definition (the block first)."""
        pairs = set()
        for covering in layer_coverage(self.overrides, self.n_layers):
            attn, pos = ("block",), ("positional",)
            for j in covering:
                if self.overrides[j].attention is not None:
                    attn = ("overrides", j)
                if self.overrides[j].positional is not None:
                    pos = ("overrides", j, "positional")
            pairs.add((attn, pos))
        return sorted(pairs, key=lambda p: (len(p[0]), p[0][1:], len(p[1]), p[1][1:]))

    def _rotary_checks(self):
        """RoPE's checks, per positional: a layer it rotates needs an even rotary size, and the layers that share one
        positional the same size."""
        first: dict[tuple, tuple[int, tuple]] = {}        # positional -> (size, attention) of its first layer
        told: set[tuple] = set()
        for attn_at, pos_at in self._pairings():
            positional = self.positional if pos_at == ("positional",) else self.overrides[pos_at[1]].positional
            attn = (self.block if attn_at == ("block",) else self.overrides[attn_at[1]]).attention
            origin = attn.rotary_origin
            if not positional.rotates_heads or origin is None:
                continue              # no rotation here, or the attention's own check reports the problem
            key, how, fix = origin
            where = attn_at + ("attention", key)
            if attn.rotary_size % 2:
                if where not in told:
                    told.add(where)
                    yield where, f"RoPE needs an even head dimension, but {how}; {fix}"
                continue
            size, first_at = first.setdefault(pos_at, (attn.rotary_size, attn_at))
            if size != attn.rotary_size and pos_at not in told:
                told.add(pos_at)
                which = "every layer" if pos_at == ("positional",) else f"every layer of {_shown(pos_at)}"
                yield where, (f"with RoPE {which} needs the same head dimension; this block gives "
                              f"{attn.rotary_size}, {_shown(first_at)}.attention gives {size}")


def _shown(at: tuple) -> str:
    """``("overrides", 0)`` -> ``model.overrides[0]``."""
    return "model" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in at)


def build_model_spec(model: dict, vocab_size: int | None = None, catalog: Catalog | None = None) -> ModelSpec:
    """A validated ``model:`` mapping as a ModelSpec, its vocabulary resolved (see :meth:`ModelSpec.with_vocab`).

    ``catalog``: the registered kinds (default: the model kinds and plug-ins).
    """
    return build(ModelSpec, model, catalog or model_catalog()).with_vocab(vocab_size)
