"""Instruction fine-tuning (SFT) on Alpaca-style records, with the loss on the response only.

Each record becomes ``prompt + response + end`` tokens (see ``template.py``);
targets of prompt positions are -1, so only the response and its end marker
are learned (``loss_on_prompt: true`` learns the prompt too).  A record longer
than ``context_length + 1`` tokens is cut at the end (counted in the plan); one
whose prompt alone fills the window is dropped.

Batching (``batching:``):

* ``pad`` (default): one record per row, rows right-padded to the longest in
  the batch (padding has target -1 and, being after the record, is never seen
  by its causal attention);
* ``pack``: records are packed once, in a fixed seeded order, into windows of up
  to ``context_length + 1`` tokens (greedily, in order); each window is one row.
  Records in a window attend to the earlier ones (no cross-record masking, as
  in most packed SFT), fewer padding tokens are computed.

Either way rows are visited in seeded epochs (``UnitBatches``).  Validation
loss is the mean cross-entropy per response token over the held-out records
(``val_data``, or a fixed ``val_fraction`` of ``data``).
"""
from __future__ import annotations


import numpy as np

from ..data import DataError
from ..data.units import masked_rows
from ..train.evaluation import token_loss
from .records import load_instructions, split_off
from .spec import InstructionSpec
from .task import FinetuneTask
from .template import ChatPrompt, make_template

Encoded = tuple[list[int], int]      # (tokens, prompt length)


def pack(encoded: list[Encoded], window: int, seed: int = 0) -> list[list[Encoded]]:
    """Greedy packing, in a seeded order, into groups of at most ``window`` tokens."""
    groups: list[list[Encoded]] = []
    current: list[Encoded] = []
    used = 0
    for i in np.random.default_rng([seed, 3]).permutation(len(encoded)).tolist():
        rec = encoded[i]
        if current and used + len(rec[0]) > window:
            groups.append(current)
            current, used = [], 0
        current.append(rec)
        used += len(rec[0])
    if current:
        groups.append(current)
    return groups


class InstructionTuning(FinetuneTask):
    """Instruction tuning (SFT) from a trained run: prompt/response records through a template, the loss on the
    response tokens only."""
    kind = "instruction"
    Spec = InstructionSpec
    builtin_data = "instructions"
    collate = staticmethod(masked_rows)        # prompt tokens masked out of the targets
    evaluation = staticmethod(token_loss)      # mean cross-entropy per response token

    def load(self) -> None:
        spec = self.spec
        self.template = make_template(spec.template, self.tokenizer)
        records = load_instructions(self.path(spec.data))
        if spec.val_data:
            train, val = records, load_instructions(self.path(spec.val_data, "val_data"))
        else:
            train, val = split_off(records, spec.val_fraction)
        train_enc, val_enc = self._encode(train, spec.data), self._encode(val, spec.val_data or spec.data)
        if not train_enc:
            raise DataError(f"{spec.data}: no record fits the context length ({self.context_length} tokens) with "
                            "room for a response")
        if not val_enc:
            raise DataError(f"{spec.val_data or spec.data}: no validation record fits the context length")
        self.n_records = (len(train_enc), len(val_enc))
        self.train_units = pack(train_enc, self.context_length + 1) if spec.batching == "pack" \
            else [[e] for e in train_enc]
        self.val_units = [[e] for e in val_enc]

    def _encode(self, records, name: str) -> list[Encoded]:
        out, dropped, cut = [], 0, 0
        for i, rec in enumerate(records, start=1):
            try:
                enc = self.template.encode(rec, self.context_length + 1)
            except (DataError, ValueError) as e:
                raise DataError(f"{name}: record {i}: {e}") from None
            if enc is None:
                dropped += 1
                continue
            ids, n_prompt, truncated = enc
            cut += truncated
            out.append((ids, 0 if self.spec.loss_on_prompt else n_prompt))
        if dropped or cut:
            self.notes.append(f"{name}: {cut} record(s) cut to {self.context_length + 1} tokens, {dropped} dropped "
                              "(prompt alone fills the context)")
        return out

    def describe(self) -> str:
        n_train, n_val = self.n_records
        rows = f"{len(self.train_units):,} packed rows" if self.spec.batching == "pack" else "padded batches"
        if isinstance(self.template, ChatPrompt):
            end = f"the chat template's end of turn ({self.template.chat.origin})"
        else:
            end = "end-of-text token" if self.template.end_text is None else f"end text {self.template.end_text!r}"
        return "\n".join([f"instruction tuning {self.source_line()}",
                          f"  {n_train:,} train / {n_val:,} validation records ({rows}; responses end with {end}; "
                          f"loss on {'prompt and ' if self.spec.loss_on_prompt else ''}response tokens)",
                          *[f"  note: {n}" for n in self.notes]])
