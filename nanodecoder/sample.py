"""Text generation from a trained run, with the model's KV cache.

    python -m nanodecoder.sample RUN_DIR --prompt "ROMEO:" --max-new-tokens 200 \
        --temperature 0.8 --top-k 200 --top-p 0.95 --seed 1 [--checkpoint best|latest|step_000500]

Loads the run's resolved ``blueprint.yaml``, its tokenizer and the chosen
checkpoint's safetensors weights.  Decoding feeds only the new token to the
model once the prompt is in the cache, so the cost of a token does not grow with
the text generated so far; past the context length it falls back to
re-reading the last ``context_length`` tokens (the uncached result).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        cache = model.new_kv_cache(idx.size(0), ctx) if use_cache else None
        pending = idx  # tokens not yet seen by the cache
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos + pending.size(1) <= ctx:
                logits = model(pending, cache=cache).logits[:, -1, :]
            else:  # uncached, or the cache is full: re-read the window (absolute positions shift)
                cache = None
                logits = model(idx[:, -ctx:]).logits[:, -1, :]
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


def load_run_model(run_dir: Path, which: str = "best", device: str = "cpu"):
    """(model, tokenizer, checkpoint path) of a run directory."""
    from .config import load_blueprint
    from .data import load_tokenizer
    from .model import build_model, build_model_spec
    from .train.checkpoint import load_model_weights
    from .train.rundir import RunDir
    run = RunDir.open(run_dir)
    bp = load_blueprint(run / RunDir.BLUEPRINT)
    tokenizer = load_tokenizer(run / RunDir.TOKENIZER)
    spec = build_model_spec(bp.raw["model"], tokenizer.vocab_size)
    if which == "best" and run.checkpoints.best() is None:
        which = "latest"  # no evaluation improved (or keep_best off): the newest weights
    path = run.checkpoints.resolve(which)
    model = build_model(spec, device=device)  # real init: non-persistent buffers (RoPE tables) get filled
    load_model_weights(model, path)
    model.eval()
    return model, tokenizer, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanodecoder.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory (<runs_dir>/<name>/<timestamp>)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--checkpoint", default="best", help="best, latest, or a folder name like step_000500")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from .cli_common import fail
    from .config import BlueprintError
    from .data import DataError
    from .train.checkpoint import CheckpointError
    from .train.rundir import RunDirError
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1) \
            or (args.top_p is not None and not 0 < args.top_p <= 1):
        return fail(ValueError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1"))
    try:
        model, tok, path = load_run_model(args.run_dir, args.checkpoint, args.device)
        print(f"# {path}", file=sys.stderr, flush=True)
        texts = sample_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            num_samples=args.num_samples, device=args.device)
    except (BlueprintError, DataError, CheckpointError, RunDirError, ValueError) as e:
        return fail(e)
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
