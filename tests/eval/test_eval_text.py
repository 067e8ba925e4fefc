"""Loss / bits per byte on any text: every token scored once, windows agree with a direct computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanodecoder.data import ByteTokenizer, DataError
from nanodecoder.eval.text import evaluate_text, windows
from nanodecoder.model import build_model, build_model_spec

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 2


@pytest.fixture(scope="module")
def model():
    spec = build_model_spec({"vocab_size": 256, "context_length": 16, "d_model": 32, "n_layers": 2,
                             "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}})
    return build_model(spec, seed=1).eval()


@pytest.mark.parametrize("n, ctx, stride", [(2, 4, 4), (10, 4, 4), (11, 4, 1), (37, 8, 3), (100, 16, 16), (5, 16, 7)])
def test_windows_score_every_token_once_with_at_most_context_length_inputs(n, ctx, stride):
    scored = []
    for start, first, end in windows(n, ctx, stride):
        assert 0 <= start < first <= end + 1 and end - start <= ctx and end <= n - 1
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


@torch.no_grad()
def test_sliding_window_equals_a_direct_per_token_computation(model):
    """stride 1: each token is predicted from the full context_length tokens before it (when there are)."""
    tok, text = ByteTokenizer(), TEXT[:60]
    ids = tok.encode(text)
    total = 0.0
    for t in range(1, len(ids)):
        ctx = ids[max(0, t - 16):t]
        logits = model(torch.tensor([ctx]), torch.tensor([ctx])).logits[0, -1]
        total -= float(F.log_softmax(logits.double(), -1)[ids[t]])
    r = evaluate_text(model, tok, text, stride=1, batch_size=5)
    # no end-of-text token: the first byte is only context
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode()) - 1
    assert r["loss"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)
    assert r["bpb"] == pytest.approx(total / (math.log(2) * r["bytes"]), abs=1e-5)


@torch.no_grad()
def test_chunks_equal_the_forward_pass_loss(model):
    tok = ByteTokenizer()
    ids = torch.tensor(tok.encode(TEXT))
    n = len(ids)
    total, count = 0.0, 0
    for start in range(0, n - 1, 16):                       # non-overlapping windows of 16 inputs
        x, y = ids[start:min(start + 16, n - 1)], ids[start + 1:min(start + 17, n)]
        total += model(x[None], y[None]).ce_loss.item() * len(y)
        count += len(y)
    r = evaluate_text(model, tok, TEXT, batch_size=3)
    assert r["stride"] == 16 and r["tokens"] == count == n - 1
    assert r["loss"] == pytest.approx(total / count, abs=1e-5)


def test_text_the_tokenizer_cannot_encode_is_a_clear_error():
    from nanodecoder.data import CharTokenizer
    tok = CharTokenizer("abc ")
    spec = build_model_spec({"vocab_size": 4, "context_length": 8, "d_model": 16, "n_layers": 1,
                             "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}})
    with pytest.raises(DataError, match="held.txt: the char tokenizer cannot encode it"):
        evaluate_text(build_model(spec), tok, "abd", name="held.txt")


@torch.no_grad()
def test_a_soft_capped_head_is_scored_as_training_scores_it():
    """With ``logit_softcap`` the loss is that of the capped logits (the eval used the bare head before)."""
    spec = build_model_spec({"vocab_size": 256, "context_length": 16, "d_model": 32, "n_layers": 1,
                             "logit_softcap": 0.5,
                             "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}})
    capped = build_model(spec, seed=3).eval()
    with torch.no_grad():
        capped.head.weight.mul_(50)                          # logits well beyond the cap
    tok = ByteTokenizer()
    ids = torch.tensor(tok.encode(TEXT[:17]))
    want = capped(ids[None, :-1], ids[None, 1:]).ce_loss.item()
    assert evaluate_text(capped, tok, TEXT[:17])["loss"] == pytest.approx(want, abs=1e-5)
