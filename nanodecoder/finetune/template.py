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

With ``chat: true`` (:class:`ChatPrompt`) the run's chat template (an imported
model's ``chat_template``) formats the record as a user message and the
assistant's answer; the prompt is what the template gives with
``add_generation_prompt``, and the loss is on the rest of the conversation (the
answer and the template's end of turn).
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

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        return list(self.tokenizer.encode(self.prompt(instruction, input)))

    def encode(self, rec: Instruction, max_tokens: int) -> tuple[list[int], int, bool] | None:
        """``(prompt + response + end tokens, prompt length, truncated)``, cut to ``max_tokens``;
        None when the prompt leaves no room for a response token."""
        prompt = self.prompt_ids(rec.instruction, rec.input)
        return _cut(prompt, prompt + list(self.tokenizer.encode(rec.output)) + self.end_ids, max_tokens)

    def response(self, ids: list[int]) -> tuple[str, bool]:
        """The text of generated ``ids`` up to the end marker, and whether the marker was reached."""
        eot = self.tokenizer.eot_id
        if self.end_text is None and eot is not None and eot in ids:
            return self.tokenizer.decode(ids[:ids.index(eot)]), True
        text = self.tokenizer.decode([i for i in ids if i != eot])
        if self.end_text and self.end_text in text:
            return text[:text.index(self.end_text)], True
        return text, False


def _cut(prompt: list[int], ids: list[int], max_tokens: int) -> tuple[list[int], int, bool] | None:
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    if len(ids) <= len(prompt):
        return None
    return ids, len(prompt), truncated


class ChatPrompt:
    """Records (and questions) formatted by a chat template: the instruction (a blank line, then the input if any)
    is the user message, the output the assistant's answer."""

    end_text = None
    _PROBE = "\u2063answer\u2063"        # an answer text no template changes, to find what follows an answer

    def __init__(self, tokenizer, chat=None):
        self.tokenizer, self.chat = tokenizer, chat if chat is not None else tokenizer.chat
        if self.chat is None:
            raise DataError("finetune.template.chat: the run's tokenizer has no chat template (only an imported "
                            "Hugging Face model that ships chat_template has one); use the text template instead")
        self.stop_ids = self._stop_ids()

    @staticmethod
    def messages(instruction: str, input: str = "", output: str | None = None) -> list[dict[str, str]]:
        user = f"{instruction}\n\n{input}" if input.strip() else instruction
        out = [{"role": "user", "content": user}]
        return out + ([{"role": "assistant", "content": output}] if output is not None else [])

    def prompt(self, instruction: str, input: str = "") -> str:
        return self.chat.render(self.messages(instruction, input), add_generation_prompt=True)

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        return self.tokenizer.encode_special(self.prompt(instruction, input))

    def encode(self, rec: Instruction, max_tokens: int) -> tuple[list[int], int, bool] | None:
        """Like :meth:`PromptTemplate.encode`; the answer part is what the whole conversation adds to the prompt."""
        prompt = self.prompt(rec.instruction, rec.input)
        full = self.chat.render(self.messages(rec.instruction, rec.input, rec.output))
        if not full.startswith(prompt):
            raise DataError(f"{self.chat.origin}: the conversation with the answer does not begin with the prompt "
                            "the template gives for add_generation_prompt, so the answer cannot be told apart for "
                            "the loss")
        prompt_ids = self.tokenizer.encode_special(prompt)
        return _cut(prompt_ids, prompt_ids + self.tokenizer.encode_special(full[len(prompt):]), max_tokens)

    def _stop_ids(self) -> set[int]:
        """The end-of-text and eos tokens, and the special token the template puts right after an answer."""
        specials = self.tokenizer.special_tokens()
        stops = {self.tokenizer.eot_id} if self.tokenizer.eot_id is not None else set()
        if self.chat.tokens.get("eos_token") in specials:
            stops.add(specials[self.chat.tokens["eos_token"]])
        full = self.chat.render(self.messages("?", "", self._PROBE))
        if self._PROBE in full:
            tail = self.tokenizer.encode_special(full[full.index(self._PROBE) + len(self._PROBE):])
            if tail and tail[0] in specials.values():
                stops.add(tail[0])
        if not stops:
            raise DataError(f"{self.chat.origin}: no token ends an answer (no eos_token, no end-of-text token and "
                            "no special token after the answer); answers could not stop")
        return stops

    def response(self, ids: list[int]) -> tuple[str, bool]:
        """The text of generated ``ids`` before the first stop token, and whether one was reached."""
        for k, i in enumerate(ids):
            if i in self.stop_ids:
                return self.tokenizer.decode(ids[:k]), True
        return self.tokenizer.decode(ids), False


def make_template(spec: TemplateSpec, tokenizer):
    """The template ``finetune.template`` describes (a chat template with ``chat: true``)."""
    return ChatPrompt(tokenizer) if spec.chat else PromptTemplate(spec, tokenizer)


@torch.no_grad()
def answer(model, template: PromptTemplate, instruction: str, input: str = "", *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 1337,
           device: torch.device | str = "cpu") -> str:
    """The model's response to ``instruction`` (generation stops at the template's end marker)."""
    ctx = model.spec.context_length
    seq = torch.tensor([template.prompt_ids(instruction, input)], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(1, ctx)
        pending = seq[:, -ctx:]
        out: list[int] = []
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos + pending.size(1) <= ctx:
                logits = model(pending, cache=cache, logits_to_keep=1).logits[:, -1, :]
            else:  # past the context length: re-read the last window (uncached)
                cache = None
                logits = model(seq[:, -ctx:], logits_to_keep=1).logits[:, -1, :]
            tok = next_token(logits, temperature, top_k, top_p, gen)
            seq, pending = torch.cat([seq, tok], dim=1), tok
            out.append(int(tok))
            text, done = template.response(out)
            if done:
                return text
        return template.response(out)[0]
    finally:
        model.train(was_training)
