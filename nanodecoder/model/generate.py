"""Text generation with the model's KV cache: sampling filters, one token, a whole continuation.

Decoding feeds only the new token to the model once the prompt is in the
cache, so the cost of a token does not grow with the text generated so far;
past the context length it falls back to re-reading the last
``context_length`` tokens (the uncached result).
"""
from __future__ import annotations

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` most likely tokens and outside the ``top_p`` nucleus."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until the mass reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B, 1] token ids (greedy when temperature is 0)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Extend ``idx`` [B, T] by ``max_new_tokens`` tokens; returns [B, T + max_new_tokens]."""
    ctx = model.spec.context_length
    was_training = model.training
    model.eval()
    try:
        idx = idx[:, -ctx:]
        size = min(ctx, idx.size(1) + max_new_tokens)    # the positions this call can reach, not the whole context
        cache = model.new_kv_cache(idx.size(0), size) if use_cache else None
        pending = idx  # tokens not yet seen by the cache
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos + pending.size(1) <= size:
                logits = model(pending, cache=cache, logits_to_keep=1).logits[:, -1, :]
            else:  # uncached, or the cache is full: re-read the window (absolute positions shift)
                cache = None
                logits = model(idx[:, -ctx:], logits_to_keep=1).logits[:, -1, :]
            tok = next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, tok], dim=1)
            pending = tok
        return idx
    finally:
        model.train(was_training)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer.encode(prompt)) if prompt else []
    if not ids:
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from; "
                             "give a --prompt")
        ids = [eot]
    return ids


def sample_text(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, seed: int, num_samples: int = 1,
                device: torch.device | str = "cpu") -> list[str]:
    """Decode ``num_samples`` continuations of ``prompt`` (the prompt included)."""
    ids = encode_prompt(tokenizer, prompt)
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return [tokenizer.decode(row.tolist()) for row in out]
