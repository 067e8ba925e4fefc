"""Answer an instruction with an instruction-tuned run.

    python -m nanodecoder.finetune.answer RUN_DIR "Convert 45 kilometers to meters." [--input TEXT] \
        [--max-new-tokens 256] [--temperature 0] [--checkpoint best]

The instruction (and input) are formatted with the run's own prompt template
(``finetune.template`` of its blueprint; the default Alpaca template for a run
that was not instruction-tuned), decoded greedily by default, and the response
is printed up to its end marker.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .spec import TemplateSpec
from .template import PromptTemplate


def run_template(raw: dict, tokenizer) -> tuple[PromptTemplate, bool]:
    """The prompt template of a run's blueprint, and whether the run was instruction-tuned."""
    ft = raw.get("finetune") or {}
    tuned = ft.get("kind") == "instruction"
    return PromptTemplate(TemplateSpec(**(ft.get("template") or {})) if tuned else TemplateSpec(), tokenizer), tuned


@torch.no_grad()
def answer(model, template: PromptTemplate, instruction: str, input: str = "", *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 1337,
           device: torch.device | str = "cpu") -> str:
    """The model's response to ``instruction`` (generation stops at the template's end marker)."""
    from ..sample import next_token
    ctx = model.spec.context_length
    seq = torch.tensor([template.tokenizer.encode(template.prompt(instruction, input))], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(1, ctx)
        pending = seq[:, -ctx:]
        out: list[int] = []
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos + pending.size(1) <= ctx:
                logits = model(pending, cache=cache).logits[:, -1, :]
            else:  # past the context length: re-read the last window (uncached)
                cache = None
                logits = model(seq[:, -ctx:]).logits[:, -1, :]
            tok = next_token(logits, temperature, top_k, top_p, gen)
            seq, pending = torch.cat([seq, tok], dim=1), tok
            out.append(int(tok))
            text, done = template.response(out)
            if done:
                return text
        return template.response(out)[0]
    finally:
        model.train(was_training)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanodecoder.finetune.answer", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="an instruction-tuned run directory")
    p.add_argument("instruction", help="the instruction to answer")
    p.add_argument("--input", default="", help="the record's input text (optional)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--checkpoint", default="best", help="best, latest, or a folder name like step_000500")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from ..cli_common import fail
    from ..config import BlueprintError, load_blueprint
    from ..data import DataError
    from ..sample import load_run_model
    from ..train.checkpoint import CheckpointError
    from ..train.rundir import RunDir, RunDirError
    if args.max_new_tokens < 1 or args.temperature < 0:
        return fail(ValueError("need --max-new-tokens >= 1 and --temperature >= 0"))
    try:
        raw = load_blueprint(RunDir.open(args.run_dir) / RunDir.BLUEPRINT).raw
        if (raw.get("finetune") or {}).get("kind") == "classification":
            raise ValueError(f"{args.run_dir} is a classification run; it has no language-model head to answer with")
        model, tokenizer, _ = load_run_model(args.run_dir, args.checkpoint, args.device)
        template, tuned = run_template(raw, tokenizer)
        if not tuned:
            print(f"note: {args.run_dir} was not instruction-tuned; using the default Alpaca template",
                  file=sys.stderr)
        text = answer(model, template, args.instruction, args.input, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      device=args.device)
    except (BlueprintError, DataError, CheckpointError, RunDirError, ValueError) as e:
        return fail(e)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
