"""Prompt templates for instruction tuning: record -> prompt text -> tokens with a loss mask.

The default is the Alpaca template (without the ``### Input:`` part when a
record's input is empty)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<end>

``<end>`` is the tokenizer's end-of-text token when it has one (bpe,
tiktoken), else the text ``"\\n\\n### End"`` (byte, char), unless the template
names its own ``end`` text.  Placeholders are replaced in one pass, so braces or
``{input}`` inside a record's text stay as written.
"""
from __future__ import annotations

import re

import torch

from ..data import DataError
from ..model.generate import next_token
from .records import Instruction
from .spec import DEFAULT_END_TEXT, TemplateSpec

_FIELDS = re.compile(r"\{(instruction|input)\}")


def _fill(template: str, values: dict[str, str]) -> str:
    return _FIELDS.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class PromptTemplate:
    def __init__(self, spec: TemplateSpec, tokenizer):
        self.spec, self.tokenizer = spec, tokenizer
        if spec.end is not None:
            self.end_text: str | None = spec.end
        else:
            self.end_text = None if tokenizer.eot_id is not None else DEFAULT_END_TEXT
        try:
            self.end_ids = [tokenizer.eot_id] if self.end_text is None else list(tokenizer.encode(self.end_text))
        except (DataError, ValueError) as e:
            raise DataError(f"finetune.template.end {self.end_text!r}: {e}") from None

    def prompt(self, instruction: str, input: str = "") -> str:
        section = _fill(self.spec.input, {"input": input}) if input.strip() else ""
        return _fill(self.spec.prompt, {"instruction": instruction, "input": section})

    def encode(self, rec: Instruction, max_tokens: int) -> tuple[list[int], int, bool] | None:
        """``(prompt + response + end tokens, prompt length, truncated)``, cut to ``max_tokens``;
        None when the prompt leaves no room for a response token."""
        prompt = list(self.tokenizer.encode(self.prompt(rec.instruction, rec.input)))
        ids = prompt + list(self.tokenizer.encode(rec.output)) + self.end_ids
        truncated = len(ids) > max_tokens
        ids = ids[:max_tokens]
        if len(ids) <= len(prompt):
            return None
        return ids, len(prompt), truncated

    def response(self, ids: list[int]) -> tuple[str, bool]:
        """The text of generated ``ids`` up to the end marker, and whether the marker was reached."""
        eot = self.tokenizer.eot_id
        if self.end_text is None and eot is not None and eot in ids:
            return self.tokenizer.decode(ids[:ids.index(eot)]), True
        text = self.tokenizer.decode([i for i in ids if i != eot])
        if self.end_text and self.end_text in text:
            return text[:text.index(self.end_text)], True
        return text, False


@torch.no_grad()
def answer(model, template: PromptTemplate, instruction: str, input: str = "", *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 1337,
           device: torch.device | str = "cpu") -> str:
    """The model's response to ``instruction`` (generation stops at the template's end marker)."""
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
