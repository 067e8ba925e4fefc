"""Importing a GPT-2 folder gives tiktoken's gpt2 encoding built from its vocab.json + merges.txt; export writes them.

GPT-2's own files are not here (no network): a byte-level BPE trained in the test stands in for them, with the
GPT-2 identity check (``hf_bpe.gpt2_mismatch``) told to accept it where the test says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanodecoder.data import hf_bpe  # noqa: E402
from nanodecoder.data.bpe import TiktokenTokenizer  # noqa: E402
from nanodecoder.data.hf_tokenizer import HFTokenizer  # noqa: E402
from nanodecoder.hf import HFError, import_hf  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_gpt2_offline import TEXTS, train_bpe  # noqa: E402


def gpt2_folder(d, tokenizer_json=True):
    bpe = train_bpe(d)
    if not tokenizer_json:
        (d / "tokenizer.json").unlink()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(d)
    return bpe, hf


@pytest.fixture
def as_gpt2(monkeypatch):
    monkeypatch.setattr(hf_bpe, "gpt2_mismatch", lambda enc: None)


@pytest.mark.parametrize("tokenizer_json", [True, False])
def test_gpt2_folder_imports_as_tiktoken_gpt2_and_exports_back(tmp_path, as_gpt2, tokenizer_json, capsys):
    from nanodecoder.cli.sample import load_run_model, main as sample_main
    bpe, hf = gpt2_folder(tmp_path / "hf", tokenizer_json)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, _, _ = load_run_model(run.path)
    assert isinstance(tok, TiktokenTokenizer) and tok.encoding.name == "gpt2" and tok.eot_id == 0
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    capsys.readouterr()
    assert sample_main([str(run.path), "--prompt", "The quick", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    assert hf_main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "merges.txt").read_text() == (tmp_path / "hf" / "merges.txt").read_text()
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == json.loads((tmp_path / "hf" / "vocab.json").read_text())
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert back(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text


def test_a_tokenizer_json_that_differs_is_kept(tmp_path, as_gpt2):
    from tokenizers import Tokenizer, pre_tokenizers
    gpt2_folder(tmp_path / "hf")
    f = tmp_path / "hf" / "tokenizer.json"
    t = Tokenizer.from_file(str(f))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)      # not plain GPT-2 any more
    t.save(str(f))
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert (run.path / "tokenizer" / "hf_tokenizer.json").is_file()


def test_other_vocabularies_keep_their_tokenizer_json(tmp_path):
    gpt2_folder(tmp_path / "hf")                     # not GPT-2's 50257 tokens: the model's own tokenizer.json
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    from nanodecoder.data import load_tokenizer
    assert isinstance(load_tokenizer(run.path / "tokenizer"), HFTokenizer)


@pytest.mark.parametrize("case, message", [
    ("not_gpt2", "vocab.json: not GPT-2's vocabulary (it has"),
    ("bad_merge", "merges.txt line 3: expected two tokens separated by one space"),
    ("no_merges", "merges.txt: missing"),
])
def test_without_tokenizer_json_bad_gpt2_files_are_one_line(tmp_path, capsys, monkeypatch, case, message):
    d = tmp_path / "hf"
    gpt2_folder(d, tokenizer_json=False)
    if case == "bad_merge":
        lines = (d / "merges.txt").read_text().split("\n")
        lines[2] = lines[2] + " extra"
        (d / "merges.txt").write_text("\n".join(lines))
    if case == "no_merges":
        (d / "merges.txt").unlink()
        message = "has no tokenizer.json (only the fast-tokenizer file, or GPT-2's vocab.json + merges.txt"
    if case != "not_gpt2":
        monkeypatch.setattr(hf_bpe, "gpt2_mismatch", lambda enc: None)
    capsys.readouterr()
    assert hf_main(["import", str(d), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(HFError):
        import_hf(d, tmp_path / "run2")
