"""Text generation from a trained run, with the model's KV cache.

    python -m nanodecoder.sample RUN_DIR --prompt "ROMEO:" --max-new-tokens 200 \\
        --temperature 0.8 --top-k 200 --top-p 0.95 --seed 1 [--checkpoint best|latest|step_000500]
    python -m nanodecoder.sample RUN_DIR --chat "What is the capital of France?"

``--chat TEXT`` (instead of ``--prompt``) sends TEXT as a user message through the run's chat
template (an imported model's ``chat_template``) and prints each answer up to its end of turn.

Loads the run's resolved ``blueprint.yaml``, its tokenizer and the chosen
checkpoint's safetensors weights; the defaults are the blueprint's ``sample:``
defaults (``train/spec.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..api.loading import load_run_model
from ..finetune.template import ChatPrompt, answer
from ..model.generate import sample_text
from ..train.spec import SampleSpec
from .common import fail, user_errors

__all__ = ["load_run_model", "main"]     # load_run_model: the library's (nanodecoder/api/loading.py)


def main(argv: list[str] | None = None) -> int:
    d = SampleSpec()
    p = argparse.ArgumentParser(prog="python -m nanodecoder.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory (<runs_dir>/<name>/<timestamp>)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", default=d.prompt, help="text to continue (default: a newline)")
    what.add_argument("--chat", metavar="TEXT", default=None,
                      help="a user message to answer with the run's chat template (instead of --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--checkpoint", default="best", help="best, latest, or a folder name like step_000500")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1) \
            or (args.top_p is not None and not 0 < args.top_p <= 1):
        return fail(ValueError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1"))
    try:
        model, tok, path, _ = load_run_model(args.run_dir, args.checkpoint, args.device)
        print(f"# {path}", file=sys.stderr, flush=True)
        if args.chat is not None:
            template = ChatPrompt(tok)
            texts = [answer(model, template, args.chat, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + i,
                            device=args.device) for i in range(args.num_samples)]
        else:
            texts = sample_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                num_samples=args.num_samples, device=args.device)
    except (*user_errors(), ValueError) as e:
        return fail(e)
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0
