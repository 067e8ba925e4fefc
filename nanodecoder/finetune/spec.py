"""The ``finetune:`` section, declared: a registered task kind (category ``finetune``) and its parameters.

``finetune.kind`` picks ``instruction`` or ``classification``; the other keys
are that kind's parameters.  The YAML key ``from`` (a Python keyword) is the
field ``source``.
"""
from __future__ import annotations

from typing import Literal

from ..config.declare import Kind, context, declared, param

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}{input}\n\n### Response:\n")
ALPACA_INPUT = "\n\n### Input:\n{input}"
DEFAULT_END_TEXT = "\n\n### End"       # ends each response when the tokenizer has no end-of-text token

FROM_DOC = ("The run to start from (its weights and tokenizer): a run directory, or a folder of runs such as "
            "../runs/dense_gpt (the newest with a checkpoint); relative paths start at the blueprint's folder.")
FROM_CHECKPOINT_DOC = ("Which checkpoint of the source run: best (falls back to latest when the run has no best), "
                       "latest, or a folder name like step_000500.")
VAL_DATA_DOC = "A separate validation file in the same format; null holds out val_fraction of data instead."
VAL_FRACTION_DOC = ("Fraction of the records held out for validation (a fixed, seeded choice; at least one record) "
                    "when val_data is null.")


@declared
class TemplateSpec:
    """How a record becomes the prompt. {instruction} and {input} are replaced in 'prompt'; its {input} becomes the
    'input' text (with the record's input in it), or nothing when the record's input is empty. The response follows
    the prompt, then the end marker. With chat: true the source run's chat template formats the record instead."""
    chat: bool = param(False, doc="Format records with the source run's chat template (the chat_template an imported "
                                  "Hugging Face model ships, rendered in a Jinja sandbox; needs jinja2): the "
                                  "instruction, then a blank line and the input if any, is the user message, the "
                                  "output the assistant's answer; prompt, input and end are not used.")
    prompt: str = param(ALPACA_PROMPT, doc="The prompt; must contain {instruction} and {input}.")
    input: str = param(ALPACA_INPUT, doc="What {input} in the prompt becomes for a record with a non-empty input; "
                                         "must contain {input}.")
    end: str | None = param(None, doc="Text that ends every response (and stops answers); null: the tokenizer's "
                                      "end-of-text token, or '\\n\\n### End' for tokenizers without one (byte, "
                                      "char).")

    def check(self):
        if self.chat:
            for key, default in (("prompt", ALPACA_PROMPT), ("input", ALPACA_INPUT), ("end", None)):
                if getattr(self, key) != default:
                    yield (key,), f"with chat: true the chat template formats the record; remove {key}"
        for key, needed in (("prompt", ("{instruction}", "{input}")), ("input", ("{input}",))):
            missing = [p for p in needed if p not in getattr(self, key)]
            if missing:
                yield (key,), f"the {key} template must contain {' and '.join(missing)}"


@declared
class FromRun(Kind):
    """What every fine-tuning kind names: the run it starts from, and a separate validation file if any."""
    source: str = param(doc=FROM_DOC, key="from", min_length=1)
    from_checkpoint: str = param("best", doc=FROM_CHECKPOINT_DOC, min_length=1)
    val_data: str | None = param(None, doc=VAL_DATA_DOC)


@declared
class InstructionSpec(FromRun):
    data: str = param(doc="Alpaca-style records: a JSON list of objects (or a .jsonl file) with 'instruction', "
                          "'output' and optional 'input' (relative paths start at the blueprint's folder); "
                          "builtin:instruction_data names the 1,100 records shipped with nanodecoder.",
                      min_length=1)
    val_fraction: float = param(0.05, doc=VAL_FRACTION_DOC, exclusive_minimum=0, maximum=0.5)
    template: TemplateSpec = param(factory=TemplateSpec, doc="The prompt template (Alpaca unless given).")
    batching: Literal["pad", "pack"] = param(
        "pad", doc="pad: one record per row, padded to the longest row of the batch; pack: records packed (once, "
                   "seeded order) into windows of context_length + 1 tokens, one window per row.")
    loss_on_prompt: bool = param(False, doc="Also learn the prompt tokens (default: loss on the response and its "
                                            "end marker only; prompt targets are -1).")


@declared
class ClassificationSpec(FromRun):
    data: str = param(doc="Labelled texts: CSV with a header row, JSONL, or a JSON list of objects, each with a text "
                          "and an integer label in 0..n_classes-1 (relative paths start at the blueprint's folder).",
                      min_length=1)
    n_classes: int = param(doc="Number of classes K; labels are 0..K-1.", minimum=2)
    val_fraction: float = param(0.1, doc=VAL_FRACTION_DOC, exclusive_minimum=0, maximum=0.5)
    text_field: str = param("text", doc="Name of the text field (CSV column or JSON key).", min_length=1)
    label_field: str = param("label", doc="Name of the label field (CSV column or JSON key).", min_length=1)
    train_last_blocks: int | None = param(
        None, doc="Train only the last N transformer blocks, the final norm and the head (0: the head alone); the "
                  "rest is frozen (requires_grad false). null trains everything.", minimum=0)
    n_layers: int = context("model.n_layers")

    def check(self):
        n = self.train_last_blocks
        if n is not None and n > self.n_layers:
            yield ("train_last_blocks",), f"{n} is more than the model's {self.n_layers} blocks"
