"""``python -m nanodecoder.eval RUN --task text`` on an imported model gives transformers' own loss (the model
called with ``labels``) on the same tokens, in non-overlapping and in sliding windows."""
from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from nanodecoder.cli.eval import main as eval_main  # noqa: E402
from test_hf_interop import V, hf_tokenizer_kind, imported  # noqa: E402,F401


@pytest.mark.parametrize("stride", [None, 32])
def test_text_loss_is_transformers_loss(tmp_path, capsys, stride):
    hf, model, tok, run = imported(tmp_path, "llama")
    ctx = model.spec.context_length
    assert ctx == 64 and tok.eot_id is not None
    words = torch.randint(0, V, (128,), generator=torch.Generator().manual_seed(3)).tolist()
    text = " ".join(f"t{i}" for i in words)
    (tmp_path / "held_out.txt").write_text(text)
    capsys.readouterr()
    argv = [str(run.path), "--task", "text", "--data", str(tmp_path / "held_out.txt"), "--json"]
    assert eval_main(argv + (["--stride", str(stride)] if stride else [])) == 0
    got = json.loads(capsys.readouterr().out)

    ids = torch.tensor([tok.eot_id] + words)                 # the end-of-text token first: every word is scored
    step = stride or ctx
    total, count = 0.0, 0
    with torch.no_grad():
        for k, start in enumerate(range(0, len(ids) - 1 - ctx + step, step)):
            chunk = ids[start:start + ctx + 1][None]         # ctx inputs and the token after them
            labels = chunk.clone()
            if k:                                            # a later window scores only its last `step` tokens
                labels[:, :ctx - step + 1] = -100
            n = int((labels[:, 1:] >= 0).sum())
            total += hf(chunk, labels=labels).loss.item() * n
            count += n
    assert got["tokens"] == count == len(words)
    assert got["stride"] == step
    assert abs(got["loss"] - total / count) <= 1e-4
    assert abs(got["bpb"] - total / (math.log(2) * len(text.encode()))) <= 1e-4
