"""Answer an instruction with an instruction-tuned run.

    python -m nanodecoder.finetune.answer RUN_DIR "Convert 45 kilometers to meters." [--input TEXT] \\
        [--max-new-tokens 256] [--temperature 0] [--checkpoint best] [--chat | --no-chat]

The instruction (and input) are formatted with the run's own prompt template
(``finetune.template`` of its blueprint; for a run that was not
instruction-tuned, the chat template of an imported model that ships one, else
the default Alpaca template), decoded greedily by default, and the response is
printed up to its end marker.  ``--chat`` insists on the run's chat template,
``--no-chat`` uses the text template even where a chat template exists.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..finetune.spec import InstructionSpec, TemplateSpec
from ..finetune.template import ChatPrompt, PromptTemplate, answer, make_template
from .common import fail, user_errors
from .sample import load_run_model


def run_template(spec, tokenizer, chat: bool | None = None) -> tuple[PromptTemplate | ChatPrompt, bool]:
    """The prompt template of a run (its RunSpec), and whether the run was instruction-tuned.

    ``chat``: True insists on the tokenizer's chat template, False never uses it, None (default) uses the run's
    ``finetune.template``, or for a run that was not instruction-tuned its chat template if it has one."""
    tuned = isinstance(spec.finetune, InstructionSpec)
    if chat:
        return ChatPrompt(tokenizer), tuned
    if tuned and (chat is None or not spec.finetune.template.chat):
        return make_template(spec.finetune.template, tokenizer), tuned
    if chat is None and tokenizer.chat is not None:
        return ChatPrompt(tokenizer), tuned
    return PromptTemplate(TemplateSpec(), tokenizer), tuned


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
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="--chat: use the run's chat template (an imported model's); --no-chat: never "
                        "(default: the run's own template, or its chat template if it was not instruction-tuned)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0:
        return fail(ValueError("need --max-new-tokens >= 1 and --temperature >= 0"))
    try:
        model, tokenizer, _, spec = load_run_model(args.run_dir, args.checkpoint, args.device, lm_only=True,
                                                   task="answer with")
        template, tuned = run_template(spec, tokenizer, args.chat)
        if not tuned:
            which = "its chat template" if isinstance(template, ChatPrompt) else "the default Alpaca template"
            print(f"note: {args.run_dir} was not instruction-tuned; using {which}", file=sys.stderr)
        text = answer(model, template, args.instruction, args.input, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      device=args.device)
    except (*user_errors(), ValueError) as e:
        return fail(e)
    print(text)
    return 0
