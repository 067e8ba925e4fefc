"""HellaSwag: batched scoring equals a slow one-example-at-a-time computation; data errors are clear."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from evalhelpers import HELLASWAG
from nanodecoder.data import ByteTokenizer, CharTokenizer, DataError
from nanodecoder.eval.hellaswag import NORMALIZATION, Scored, evaluate_hellaswag, load_items, score_items, summarize
from nanodecoder.model import build_model, build_model_spec


def tiny_model(context_length: int = 128, vocab_size: int = 256, seed: int = 0):
    spec = build_model_spec({"vocab_size": vocab_size, "context_length": context_length, "d_model": 32,
                             "n_layers": 2, "positional": {"kind": "rope"},
                             "block": {"attention": {"kind": "causal", "n_heads": 4}, "mlp": {"kind": "gelu"}}})
    model = build_model(spec, seed=seed)
    with torch.no_grad():
        model.head.weight.mul_(10)       # sharper than the init, so the endings' scores differ clearly
    return model.eval()


@torch.no_grad()
def slow_scores(model, tokenizer, item) -> tuple[list[float], list[int]]:
    """Per ending: the summed log-probability of its tokens, one unpadded sequence at a time,
    through the ordinary forward pass; left-truncated to context_length + 1 tokens."""
    ctx_len = model.spec.context_length
    sums, counts = [], []
    for ending in item.endings:
        ctx, end = tokenizer.encode(item.ctx), tokenizer.encode(" " + ending)
        seq = (ctx + end)[-(ctx_len + 1):]
        n = min(len(end), len(seq) - 1)
        x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
        logp = F.log_softmax(model(x, y).logits[0].double(), dim=-1)
        total = 0.0
        for pos in range(len(seq) - 1 - n, len(seq) - 1):
            total += float(logp[pos, seq[pos + 1]])
        sums.append(total)
        counts.append(n)
    return sums, counts


@pytest.mark.parametrize("context_length, batch_size", [(128, 4), (24, 3)])   # 24: contexts left-truncated
def test_batched_scores_equal_the_slow_direct_computation(context_length, batch_size):
    model, tok = tiny_model(context_length), ByteTokenizer()
    items = load_items(HELLASWAG)
    scored, skipped = score_items(model, tok, items, batch_size=batch_size)
    assert skipped == 0 and len(scored) == len(items) == 6
    preds, preds_norm = [], []
    for item, got in zip(items, scored):
        sums, counts = slow_scores(model, tok, item)
        assert got.n_tokens == counts
        assert got.sum_logprob == pytest.approx(sums, abs=2e-4)
        preds.append(max(range(4), key=lambda i: sums[i]))
        preds_norm.append(max(range(4), key=lambda i: sums[i] / counts[i]))
    assert [s.pred for s in scored] == preds and [s.pred_norm for s in scored] == preds_norm
    result = evaluate_hellaswag(model, tok, HELLASWAG, batch_size=batch_size)
    labels = [it.label for it in items]
    assert result["acc"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 6)
    assert result["acc_norm"] == pytest.approx(sum(p == y for p, y in zip(preds_norm, labels)) / 6)
    assert result["acc_norm_normalization"] == NORMALIZATION == "per_token_mean"


def test_acc_norm_divides_by_the_number_of_ending_tokens():
    s = Scored(sum_logprob=[-10.0, -12.0], n_tokens=[2, 6], label=1)
    assert s.pred == 0 and s.pred_norm == 1            # -10 > -12, but -12/6 = -2 > -10/2 = -5
    out = summarize([s])
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0 and out["n"] == 1


def test_any_tokenizer_items_it_cannot_encode_are_skipped_and_counted(tmp_path):
    items = load_items(HELLASWAG)
    tok = CharTokenizer(set(" ".join(it.ctx + " " + " ".join(it.endings) for it in items)))
    odd = {"ctx": "A cat sits.", "endings": ["It purrs Ω.", "It flies.", "It sings.", "It reads."], "label": 0}
    path = tmp_path / "hs.jsonl"
    path.write_text(HELLASWAG.read_text() + json.dumps(odd) + "\n")   # 'Ω' is not in the char vocabulary
    result = evaluate_hellaswag(tiny_model(vocab_size=tok.vocab_size), tok, path)
    assert result["n"] == 6 and result["skipped"] == 1


def test_limit_reads_the_first_items_only():
    assert [it.label for it in load_items(HELLASWAG, limit=2)] == [2, 0]


@pytest.mark.parametrize("record, message", [
    ({"ctx": "a", "endings": ["b", "c"]}, "record 2 (line 2): missing field 'label'"),
    ({"ctx": "a", "endings": ["b", "c"], "label": 2}, "record 2 (line 2): 'label' must be an integer in 0..1"),
    ({"ctx": "a", "endings": "b", "label": 0}, "record 2 (line 2): 'endings' must be a list"),
    ([1, 2], "record 2 (line 2): expected a JSON object"),
])
def test_bad_records_name_the_record(tmp_path, record, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "ok", "endings": ["x", "y"], "label": 1}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_items(path)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n\n{"ctx": oops}\n')
    with pytest.raises(DataError, match=r"record 2 \(line 3\): not valid JSON"):
        load_items(path)
    with pytest.raises(DataError, match="rowanz/hellaswag"):
        load_items(tmp_path / "missing.jsonl")
