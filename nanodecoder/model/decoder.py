"""The decoder-only transformer: the token embedding (scaled with ``embed_scale``, plus the model's additive
positions), the stack of blocks (``block.py``), the final norm, the output head (soft-capped with
``logit_softcap``) and the loss; also what a forward returns (:class:`ModelOutput`) and the per-layer KV cache.

The parts of each block (attention, MLP, norms) and the positional encodings are registered components; this file
composes them and computes each distinct positional encoding's rotary once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block, Rotaries
from .spec import ModelSpec


@dataclass
class ModelOutput:
    # with targets: detached (differentiate ``loss``); a compiled graph would otherwise
    # materialise a zero [B, T, V] gradient for this unused output on every step
    logits: torch.Tensor
    loss: torch.Tensor | None = None        # training objective: ce_loss + aux_loss (+ mtp_loss)
    ce_loss: torch.Tensor | None = None     # cross-entropy only (what we report)
    aux_loss: torch.Tensor | None = None    # weighted auxiliary losses summed over layers
    mtp_loss: torch.Tensor | None = None    # model.mtp: loss_weight x the modules' mean cross-entropy
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer3.load", "layer3.lb_loss", ...


class KVCache(list):
    """One cache per block (each attention layer makes its own: ``attn.new_cache``); ``pos`` is the number of
    positions cached."""

    @property
    def pos(self) -> int:
        return self[0].pos


class UNetSkips(nn.Module):
    """``model.unet_skips``: block ``sources[j]``'s output, times ``weight[j]``, joins the input of block
    n_layers - 1 - sources[j]."""

    def __init__(self, sources: list[int], n_layers: int, start: float):
        super().__init__()
        self.sources, self.start = tuple(sources), start
        self.into = {n_layers - 1 - i: j for j, i in enumerate(sources)}     # receiving block -> skip
        self.weight = nn.Parameter(torch.full((len(sources),), float(start)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.start)


class MTPModule(nn.Module):
    """One multi-token-prediction module (DeepSeek-V3, section 2.2): ``block(proj([hnorm(h); enorm(emb)]))``, then
    its own final ``norm`` before the model's (shared) output head."""

    def __init__(self, spec: ModelSpec, rotary_index: int):
        super().__init__()
        self.hnorm, self.enorm = spec.final.build(), spec.final.build()
        self.proj = nn.Linear(2 * spec.d_model, spec.d_model, bias=False)
        self.block = Block(spec.mtp_block, spec.norm_placement, rotary_index, spec.vocab_size)
        self.norm = spec.final.build()

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rotary: Rotaries):
        return self.block(self.proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1)), rotary)


class Decoder(nn.Module):

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.vocab_size == "auto":
            raise ValueError("model.vocab_size is 'auto' but no tokenizer vocabulary size is known yet")
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos = spec.positional.build()          # the model's: its embed(pos) is added to the input
        # the other positionals some layers have (an override's: NoPE, RoPE at another theta), each built once
        mtp = [spec.mtp_block] if spec.mtp is not None else []
        distinct = list(dict.fromkeys([spec.positional, *(b.positional for b in (*spec.blocks, *mtp))]))
        self.layer_positionals = nn.ModuleList(p.build() for p in distinct[1:])
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(b, spec.norm_placement, distinct.index(b.positional), spec.vocab_size)
                                    for b in spec.blocks)
        self.norm = spec.final.build()
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.wte.weight
        if spec.unet_skips is not None:
            self.skips = UNetSkips(spec.unet_skips.indices(spec.n_layers), spec.n_layers, spec.unet_skips.weight)
        if spec.mtp is not None:
            self.mtp = nn.ModuleList(MTPModule(spec, distinct.index(spec.mtp_block.positional))
                                     for _ in range(spec.mtp.depth))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Logits [B, T, V] for every position of ``idx`` [B, T] (with ``targets``: and the loss).

        ``logits_to_keep=N`` (without targets): the last N positions' only, [B, N, V], as in transformers;
        generation passes 1, so a long prompt never goes through the [T, V] head."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), not {logits_to_keep!r}")
        if targets is not None and logits_to_keep:
            raise ValueError("logits_to_keep applies without targets: the loss needs every position's logits")
        if targets is not None and cache is not None and hasattr(self, "mtp"):
            raise ValueError("model.mtp's loss needs the whole sequence: call the model with targets without a KV "
                             "cache")
        h, aux_loss, stats = self.stream(idx, cache=cache)
        x = self.norm(h)
        if targets is None:              # generation: the MTP modules are not used
            kept = x[:, -logits_to_keep:, :] if logits_to_keep else x
            return ModelOutput(logits=self.logits(kept), aux_loss=aux_loss, stats=stats)
        logits = self.logits(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        mtp_loss = None
        if hasattr(self, "mtp"):
            mtp_loss, aux_loss = self.mtp_loss(h, idx, targets, aux_loss, stats)
        loss = ce if aux_loss is None else ce + aux_loss
        if mtp_loss is not None:
            loss = loss + mtp_loss
        return ModelOutput(logits=logits.detach(), loss=loss, ce_loss=ce, aux_loss=aux_loss, mtp_loss=mtp_loss,
                           stats=stats)

    def mtp_loss(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, aux_loss, stats: dict):
        """``(loss_weight / depth x the sum of the modules' cross-entropies, aux_loss with theirs added)``: module k
        sees positions 0..T-1-k, the embeddings of the tokens k ahead of them, and predicts the targets k ahead
        (``stats``: ``mtp{k}.ce_loss`` and its block's statistics)."""
        T = idx.shape[1]
        total = None
        for k, module in enumerate(self.mtp, 1):
            n = T - k
            if n <= 0:
                break
            pos = torch.arange(n, device=idx.device)
            h, aux = module(h[:, :n], self.embed(idx[:, k:]), self.rotaries(pos, idx[:, :n]))
            logits = self.logits(module.norm(h))
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets[:, k:].reshape(-1),
                                 ignore_index=-1)
            stats[f"mtp{k}.ce_loss"] = ce.detach()
            for name, value in aux.items():
                if name == "loss":
                    aux_loss = value if aux_loss is None else aux_loss + value
                else:
                    stats[f"mtp{k}.{name}"] = value
            total = ce if total is None else total + ce
        if total is None:
            return None, aux_loss
        return total * (self.spec.mtp.loss_weight / self.spec.mtp.depth), aux_loss

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``idx`` (scaled by sqrt(d_model) under ``embed_scale``)."""
        x = self.wte(idx)
        if self.spec.embed_scale:      # Gemma: sqrt(d_model), rounded to the activations' dtype
            x = x * torch.tensor(self.spec.d_model ** 0.5, dtype=x.dtype)
        return x

    def rotaries(self, pos: torch.Tensor, idx: torch.Tensor) -> Rotaries:
        """Every distinct positional's rotary at ``pos`` (each block takes its own) and the token ids."""
        return Rotaries((p.rotary(pos) for p in (self.pos, *self.layer_positionals)), tokens=idx)

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Final-norm hidden states [B, T, d_model], the summed auxiliary loss (or None) and the stats
        (what ``forward`` feeds the head; evaluation and classification heads use it directly)."""
        x, aux_loss, stats = self.stream(idx, cache=cache)
        return self.norm(x), aux_loss, stats

    def stream(self, idx: torch.Tensor, *, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The residual stream after the last block [B, T, d_model] (before the final norm), the summed auxiliary
        loss (or None) and the stats."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.spec.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.spec.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.embed(idx)
        add = self.pos.embed(pos)
        if add is not None:
            x = x + add
        x = self.drop(x)
        rotary = self.rotaries(pos, idx)          # each block takes its own
        aux_loss = None
        stats: dict[str, torch.Tensor] = {}
        skips = getattr(self, "skips", None)
        sent: dict[int, torch.Tensor] = {}        # model.unet_skips: the outputs of the blocks that send one
        for i, block in enumerate(self.blocks):   # runtime.activation_checkpointing: the runtime makes each block
            if skips is not None and i in skips.into:                                # recompute itself
                j = skips.into[i]
                x = x + skips.weight[j].to(x.dtype) * sent.pop(skips.sources[j])
            x, aux = block(x, rotary, cache[i] if cache is not None else None)    # (runtime/core.py)
            if skips is not None and i in skips.sources:
                sent[i] = x
            for name, value in aux.items():
                if name == "loss":
                    aux_loss = value if aux_loss is None else aux_loss + value
                else:
                    stats[f"layer{i}.{name}"] = value
        return x, aux_loss, stats

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head, soft-capped (``cap * tanh(logits / cap)``) when ``logit_softcap`` is set."""
        logits = self.head(x)
        cap = self.spec.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """Empty per-layer caches for incremental decoding of up to ``max_len`` positions."""
        max_len = max_len or self.spec.context_length
        p = self.wte.weight
        return KVCache(b.attn.new_cache(batch_size, max_len, p.device, p.dtype) for b in self.blocks)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Let components update non-gradient state once per optimizer step (MoE bias balancing)."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()
