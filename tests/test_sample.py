"""Generation: KV-cached == uncached, top-k / top-p filtering, and the sample CLI on a trained run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import private_env  # noqa: E402

from nanodecoder.model import build_model, build_model_spec  # noqa: E402
from nanodecoder.cli.sample import main  # noqa: E402
from nanodecoder.model.generate import filter_logits, generate  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def model():
    cfg = {"vocab_size": 40, "context_length": 16, "d_model": 32, "n_layers": 2,
           "block": {"attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2}, "mlp": {"kind": "swiglu"},
                     "norm": {"kind": "rmsnorm"}},
           "positional": {"kind": "rope"}}
    m = build_model(build_model_spec(cfg), seed=3)
    with torch.no_grad():                     # sharper logits than the tiny init, so sampling is not uniform
        m.head.weight.mul_(20)
    return m.eval()


@pytest.mark.parametrize("new_tokens", [6, 20])      # 20: runs past the 16-token context
@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": 0.9, "top_k": 10},
                                    {"temperature": 1.0, "top_p": 0.8}])
def test_cached_and_uncached_generation_agree(model, kwargs, new_tokens):
    prompt = torch.tensor([[1, 5, 7, 2, 9], [3, 3, 8, 1, 0]])
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(11)
        outs.append(generate(model, prompt, new_tokens, generator=gen, use_cache=use_cache, **kwargs))
    assert outs[0].shape == (2, 5 + new_tokens)
    assert torch.equal(outs[0], outs[1])


def test_cached_decoding_feeds_one_token_per_step(model):
    lengths = []
    handle = model.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    try:
        generate(model, torch.tensor([[1, 2, 3, 4, 5, 6]]), 12, temperature=0.0)
    finally:
        handle.remove()
    assert lengths == [6] + [1] * 10 + [16]  # prompt once, then single tokens; past the context, a window


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_runs_the_head_on_the_last_position_only(model, use_cache):
    """The forward's default is every position's logits; generation asks for the last one, so a long prompt
    (or an uncached window) never goes through the [T, V] head."""
    rows = []
    handle = model.head.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[1]))
    try:
        generate(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), 5, temperature=0.0, use_cache=use_cache)
    finally:
        handle.remove()
    assert rows == [1] * 5


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]            # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.4))[0].tolist() == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7))[0].tolist() == [False, True, False, True]


def test_sample_cli_is_reproducible_per_seed(trained_run, capsys):
    args = [str(trained_run), "--prompt", "the king", "--max-new-tokens", "12", "--seed", "5", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("the king") and "step_000008" in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out
    assert main([str(trained_run), "--prompt", "the", "--temperature", "0", "--checkpoint", "step_000004",
                 "--num-samples", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("the") >= 2 and "-" * 40 in out


def test_sample_cli_errors(trained_run, tmp_path, capsys):
    assert main([str(trained_run), "--checkpoint", "step_000001"]) == 2
    assert "no 'step_000001' checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main([str(trained_run), "--top-p", "1.5"]) == 2
