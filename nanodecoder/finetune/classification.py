"""Sequence classification: the LM head replaced by a K-way linear head on the last token.

:class:`DecoderClassifier` is the decoder with ``head`` a ``Linear(d_model, K)``
(zero-initialised, so training starts at chance with loss ln K) applied to the
final-norm hidden state of each row's last real token.  Rows are right-padded
with -1 (never a token id): the model takes the last index with ``idx >= 0``
as the row's end and feeds pad positions token 0, which the causal attention
of real positions never sees.  Texts longer than ``context_length`` tokens keep
their first ``context_length`` tokens.

``train_last_blocks: N`` trains only the last N blocks, the final norm and the
head (N = 0: the head alone, a linear probe); everything else has
``requires_grad = False`` and is left out of the optimizer, so it stays
bit-identical.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataError
from ..data.units import labelled_rows
from ..model.decoder import Decoder, ModelOutput
from ..train.evaluation import label_accuracy
from .records import load_examples, split_off
from .spec import ClassificationSpec
from .task import FinetuneTask


class DecoderClassifier(Decoder):
    def __init__(self, spec, n_classes: int):
        super().__init__(spec)
        self.n_classes = n_classes
        self.head = nn.Linear(spec.d_model, n_classes)     # replaces (and unties) the LM head
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_decoder(cls, decoder: Decoder, n_classes: int) -> "DecoderClassifier":
        """A classifier holding ``decoder``'s weights (all but its LM head), on its device."""
        with torch.device(decoder.wte.weight.device):
            model = cls(decoder.spec, n_classes)
        body = {k: v for k, v in decoder.state_dict().items() if not k.startswith("head.")}
        result = model.load_state_dict(body, strict=False)
        if result.unexpected_keys or sorted(result.missing_keys) != ["head.bias", "head.weight"]:
            raise RuntimeError(f"classifier body does not match the decoder: {result}")
        return model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None) -> ModelOutput:
        real = idx >= 0
        last = (real.sum(1) - 1).clamp_min(0)
        h, aux_loss, stats = self.hidden(idx.clamp_min(0))
        logits = self.head(h[torch.arange(idx.size(0), device=idx.device), last]).float()
        if targets is None:
            return ModelOutput(logits=logits, aux_loss=aux_loss, stats=stats)
        ce = F.cross_entropy(logits, targets)
        loss = ce if aux_loss is None else ce + aux_loss
        return ModelOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux_loss, stats=stats)

    def freeze_all_but_last(self, n_blocks: int) -> None:
        """Train only the last ``n_blocks`` blocks (+ final norm when n_blocks > 0) and the head."""
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = [self.head]
        if n_blocks > 0:
            trainable += [*self.blocks[len(self.blocks) - n_blocks:], self.norm]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)


class ClassificationTuning(FinetuneTask):
    """Text classification from a trained run: a new head over the last token's hidden state, cross-entropy on
    the labels, accuracy as the evaluation."""
    kind = "classification"
    Spec = ClassificationSpec
    generates_text = False
    collate = staticmethod(labelled_rows)
    evaluation = staticmethod(label_accuracy)

    def load(self) -> None:
        spec = self.spec
        examples = load_examples(self.path(spec.data), spec.n_classes, spec.text_field, spec.label_field)
        if spec.val_data:
            train = examples
            val = load_examples(self.path(spec.val_data, "val_data"), spec.n_classes, spec.text_field,
                                spec.label_field)
        else:
            train, val = split_off(examples, spec.val_fraction)
        self.train_units = self._encode(train, spec.data)
        self.val_units = self._encode(val, spec.val_data or spec.data)

    def _encode(self, examples, name: str) -> list[tuple[list[int], int]]:
        out, cut = [], 0
        for i, (text, label) in enumerate(examples, start=1):
            try:
                ids = list(self.tokenizer.encode(text))
            except (DataError, ValueError) as e:
                raise DataError(f"{name}: record {i}: {e}") from None
            cut += len(ids) > self.context_length
            out.append((ids[:self.context_length], label))
        if cut:
            self.notes.append(f"{name}: {cut} text(s) cut to their first {self.context_length} tokens")
        return out

    def adapt_model(self, model: nn.Module) -> nn.Module:
        clf = DecoderClassifier.from_decoder(model, self.spec.n_classes)
        if self.spec.train_last_blocks is not None:
            clf.freeze_all_but_last(self.spec.train_last_blocks)
        return clf

    def describe(self) -> str:
        spec = self.spec
        train = "all parameters" if spec.train_last_blocks is None else \
            f"the last {spec.train_last_blocks} block(s) and the head (the rest frozen)"
        return "\n".join([f"{spec.n_classes}-way classification {self.source_line()}",
                          f"  {len(self.train_units):,} train / {len(self.val_units):,} validation texts; "
                          f"training {train}", *[f"  note: {n}" for n in self.notes]])
