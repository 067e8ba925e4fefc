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
    loss: torch.Tensor | None = None        # training objective: ce_loss + aux_loss
    ce_loss: torch.Tensor | None = None     # cross-entropy only (what we report)
    aux_loss: torch.Tensor | None = None    # weighted auxiliary losses summed over layers
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer3.load", "layer3.lb_loss", ...


class KVCache(list):
    """One cache per block (each attention layer makes its own: ``attn.new_cache``); ``pos`` is the number of
    positions cached."""

    @property
    def pos(self) -> int:
        return self[0].pos


class Decoder(nn.Module):

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.vocab_size == "auto":
            raise ValueError("model.vocab_size is 'auto' but no tokenizer vocabulary size is known yet")
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos = spec.positional.build()          # the model's: its embed(pos) is added to the input
        # the other positionals some layers have (an override's: NoPE, RoPE at another theta), each built once
        distinct = list(dict.fromkeys([spec.positional, *(b.positional for b in spec.blocks)]))
        self.layer_positionals = nn.ModuleList(p.build() for p in distinct[1:])
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(b, spec.norm_placement, distinct.index(b.positional)) for b in spec.blocks)
        self.norm = spec.final.build()
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Logits [B, T, V] for every position of ``idx`` [B, T] (with ``targets``: and the loss).

        ``logits_to_keep=N`` (without targets): the last N positions' only, [B, N, V], as in transformers;
        generation passes 1, so a long prompt never goes through the [T, V] head."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), not {logits_to_keep!r}")
        if targets is not None and logits_to_keep:
            raise ValueError("logits_to_keep applies without targets: the loss needs every position's logits")
        x, aux_loss, stats = self.hidden(idx, cache=cache)
        if targets is None:
            kept = x[:, -logits_to_keep:, :] if logits_to_keep else x
            return ModelOutput(logits=self.logits(kept), aux_loss=aux_loss, stats=stats)
        logits = self.logits(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        loss = ce if aux_loss is None else ce + aux_loss
        return ModelOutput(logits=logits.detach(), loss=loss, ce_loss=ce, aux_loss=aux_loss, stats=stats)

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Final-norm hidden states [B, T, d_model], the summed auxiliary loss (or None) and the stats
        (what ``forward`` feeds the head; evaluation and classification heads use it directly)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.spec.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.spec.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        if self.spec.embed_scale:      # Gemma: sqrt(d_model), rounded to the activations' dtype
            x = x * torch.tensor(self.spec.d_model ** 0.5, dtype=x.dtype)
        add = self.pos.embed(pos)
        if add is not None:
            x = x + add
        x = self.drop(x)
        rotary = Rotaries(p.rotary(pos) for p in (self.pos, *self.layer_positionals))   # each block takes its own
        aux_loss = None
        stats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):   # runtime.activation_checkpointing: the runtime makes each block
            x, aux = block(x, rotary, cache[i] if cache is not None else None)    # recompute itself (runtime/core.py)
            for name, value in aux.items():
                if name == "loss":
                    aux_loss = value if aux_loss is None else aux_loss + value
                else:
                    stats[f"layer{i}.{name}"] = value
        return self.norm(x), aux_loss, stats

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
