"""Fine-tuning data: records and their errors, the prompt template, the loss mask, packing, batches."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nanodecoder.data import ByteTokenizer, DataError
from nanodecoder.data.units import UnitBatches
from nanodecoder.finetune.instruction import InstructionTuning
from nanodecoder.finetune.records import Instruction, load_examples, load_instructions
from nanodecoder.finetune.spec import InstructionSpec, TemplateSpec
from nanodecoder.finetune.template import PromptTemplate
from nanodecoder.model import build_model, build_model_spec

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"},
           {"instruction": "Add", "input": "2 3", "output": "5"},
           {"instruction": "Sky color?", "output": "blue"},
           {"instruction": "Reverse", "input": "abc", "output": "cba"}]
SHORT = {"prompt": "Q: {instruction}{input}\nA: ", "input": " [{input}]", "end": "\n"}


class EotTokenizer(ByteTokenizer):
    """Bytes plus an end-of-text token 256."""
    vocab_size, eot_id = 257, 256


def test_alpaca_template_with_and_without_input():
    t = PromptTemplate(TemplateSpec(), ByteTokenizer())
    assert t.prompt("Convert 45 km to m.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nConvert 45 km to m.\n\n### Response:\n")
    assert t.prompt("Translate.", "Where is it?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate.\n\n### Input:\nWhere is it?\n\n### Response:\n")
    assert t.prompt("Use {input} literally", "  ") .count("{input}") == 1     # one pass; blank input = none


def test_end_marker_is_the_eot_token_or_the_end_text():
    with_eot, plain = PromptTemplate(TemplateSpec(), EotTokenizer()), PromptTemplate(TemplateSpec(), ByteTokenizer())
    assert with_eot.end_ids == [256] and plain.end_ids == list(b"\n\n### End")
    assert with_eot.response(list(b"yes") + [256] + list(b"junk")) == ("yes", True)
    assert plain.response(list(b"yes\n\n### End junk")) == ("yes", True)
    assert plain.response(list(b"unfinished")) == ("unfinished", False)
    assert list(TemplateSpec(prompt="{instruction} only").check()) == [
        (("prompt",), "the prompt template must contain {input}")]
    assert list(TemplateSpec(prompt="no fields", input="none").check()) == [
        (("prompt",), "the prompt template must contain {instruction} and {input}"),
        (("input",), "the input template must contain {input}")]


def task(tmp_path, records=RECORDS, **kw) -> InstructionTuning:
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(records))
    spec = InstructionSpec(data=str(path), source="unused", val_data=str(path), template=TemplateSpec(**SHORT), **kw)
    return InstructionTuning(spec, tokenizer=ByteTokenizer(), base_dir=tmp_path, context_length=32)


def test_only_response_tokens_have_targets(tmp_path):
    t = task(tmp_path)
    x, y = t.collate(t.train_units[:2])
    for row, [(ids, n_prompt)] in enumerate(t.train_units[:2]):      # pad mode: one record per row
        assert x[row, :len(ids) - 1].tolist() == ids[:-1]
        assert y[row, :n_prompt - 1].tolist() == [-1] * (n_prompt - 1)           # prompt: no loss
        assert y[row, n_prompt - 1:len(ids) - 1].tolist() == ids[n_prompt:]       # response + end marker
        assert (y[row, len(ids) - 1:] == -1).all()                                # padding
    rec = t.template.encode(Instruction("Say hi", "", "hi there"), 33)
    assert bytes(rec[0][rec[1]:]).decode() == "hi there\n"


def test_prompt_tokens_contribute_zero_loss(tmp_path):
    """No gradient reaches the prompt positions' logits; changing a response target changes the loss."""
    t = task(tmp_path)
    x, y = t.collate(t.train_units)
    model = build_model(build_model_spec({"vocab_size": 256, "context_length": 32, "d_model": 32, "n_layers": 1,
                                          "block": {"attention": {"kind": "causal", "n_heads": 2},
                                                    "mlp": {"kind": "gelu"}}}), seed=0)
    out = model(x, y)
    prompt = (y == -1) & (x != 0)
    assert prompt.any()
    logits = out.logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(logits.view(-1, 256), y.view(-1), ignore_index=-1)
    loss.backward()
    assert torch.allclose(loss, out.ce_loss)
    assert (logits.grad[prompt] == 0).all() and (logits.grad[y >= 0].abs().sum(-1) > 0).all()
    # the loss is the mean over the response positions only, however badly the prompt is predicted
    per_token = F.cross_entropy(out.logits.view(-1, 256), y.clamp_min(0).view(-1), reduction="none").view(y.shape)
    assert out.ce_loss.item() == pytest.approx(per_token[y >= 0].mean().item(), rel=1e-6)
    assert per_token[prompt].mean() > 3.0          # the untrained model predicts the prompt badly: no effect
    y2 = y.clone()
    r, c = (y >= 0).nonzero()[0]
    y2[r, c] = (y[r, c] + 1) % 256
    assert model(x, y2).ce_loss.item() != out.ce_loss.item()


def test_packing_fills_windows_and_keeps_every_response_once(tmp_path):
    recs = [{"instruction": f"task {i}", "output": "x" * (i % 5 + 1)} for i in range(12)]
    padded, packed = task(tmp_path, recs), task(tmp_path, recs, batching="pack")
    assert len(packed.train_units) < len(padded.train_units) == 12
    assert sum(len(u) for u in packed.train_units) == 12
    for unit in packed.train_units:
        assert sum(len(ids) for ids, _ in unit) <= 33
    x, y = packed.collate(packed.train_units)
    assert x.shape[1] <= 32
    xp, yp = padded.collate(padded.train_units)
    assert int((y >= 0).sum()) == int((yp >= 0).sum())       # the same response tokens are learned
    assert sorted(y[y >= 0].tolist()) == sorted(yp[yp >= 0].tolist())


def test_loss_on_prompt_option(tmp_path):
    t = task(tmp_path, loss_on_prompt=True)
    x, y = t.collate(t.train_units[:1])
    n = len(t.train_units[0][0][0])
    assert (y[0, :n - 1] >= 0).all()


def test_unit_batches_are_seeded_resumable_and_split_across_ranks():
    units = list(range(10))
    collate = lambda us: (torch.tensor(us), torch.tensor(us))  # noqa: E731
    a = UnitBatches(units, collate, batch_size=4, seed=3)
    first = [a.next_batch()[0].tolist() for _ in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == units          # an epoch visits every unit once
    b = UnitBatches(units, collate, batch_size=4, seed=3)
    b.next_batch()
    c = UnitBatches(units, collate, batch_size=4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch()[0].tolist() for _ in range(4)] == first[1:]
    r0, r1 = (UnitBatches(units, collate, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1))
    assert r0.next_batch()[0].tolist() + r1.next_batch()[0].tolist() == first[0]
    with pytest.raises(DataError, match="saved n_units is 10"):
        UnitBatches(units[:5], collate, batch_size=4, seed=3).load_state_dict(b.state_dict())


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}', "expected a JSON list of instruction records"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 2: missing field 'output'"),
    ('[{"instruction": "a", "output": 5}]', "record 1: 'output' must be text"),
    ('[{"instruction": "a", "output": "b"}, "text"]', "record 2: expected an object"),
    ('[{"instruction": "a", "output": "b"}', "not valid JSON"),
])
def test_bad_instruction_files_name_the_record(tmp_path, content, message):
    path = tmp_path / "inst.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_instructions(path)


def test_jsonl_instructions_and_their_line_numbers(tmp_path):
    path = tmp_path / "inst.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d"}\n')
    with pytest.raises(DataError, match=r"record 2 \(line 3\): missing field 'output'"):
        load_instructions(path)
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert load_instructions(path) == [Instruction("a", "", "b")]


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "text,label\nhello,1\nworld,3\n", r"record 2 \(line 3\): label 3 is outside 0..1"),
    ("d.csv", "text,label\nhello,one\n", "label 'one' is not an integer class index"),
    ("d.csv", "sentence,label\nhello,1\n", "no 'text' column"),
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', r"record 2 \(line 2\): missing field 'label'"),
    ("d.json", '[{"text": "a", "label": -1}]', "record 1: label -1 is outside 0..1"),
])
def test_bad_classification_files_name_the_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path, n_classes=2)
