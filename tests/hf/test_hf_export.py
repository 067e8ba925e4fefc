"""Hugging Face export: every tokenizer the ``tokenizers`` library can represent is written (and generates like
ours in transformers' pipeline), the refusal names the closest family with all its differences, and an export
never touches a user's files nor leaves a half-written folder behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from trainhelpers import REPO, private_env, subprocess_env  # noqa: E402

from nanodecoder.cli.run import main as run_main  # noqa: E402
from nanodecoder.cli.sample import main as sample_main  # noqa: E402
from nanodecoder.data import ByteTokenizer, CharTokenizer, DataError  # noqa: E402
from nanodecoder.data.bpe import BpeTokenizer  # noqa: E402
from nanodecoder.data.hf_export_tokenizer import write_hf_tokenizer  # noqa: E402
from nanodecoder.data.sources import Corpus  # noqa: E402
from nanodecoder.hf import HFError, export_hf, hf_family_for  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\tAll:  Resolved. resolved.\n") * 8
TRICKY = ["Hello world, it's 2024!  ", "  leading and trailing spaces   ", "a  \nb\r\n\n\n\ttabs\t\t end\n",
          "ünïcödé — naïve café 日本語 русский 🎉👍🏽❤️🇫🇷 \u200b zero width", "I'll we've O'Neil'S 'q'",
          "12345 3.14159 1,000,000 ½ ١٢٣", "def f(x):\n    return x**2  # c\n\n", " ", "\n", ""]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    for key, value in private_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


def char_run(tmp: Path) -> Path:
    """A tiny GPT-2-shaped model trained for a few steps on a char tokenizer."""
    (tmp / "corpus.txt").write_text(CORPUS)
    raw = {"name": "char",
           "model": {"context_length": 32, "d_model": 32, "n_layers": 2, "dropout": 0.0, "tie_embeddings": True,
                     "positional": {"kind": "learned"},
                     "block": {"norm": {"kind": "layernorm"}, "attention": {"kind": "causal", "n_heads": 4, "bias": True},
                               "mlp": {"kind": "gelu", "hidden_size": 64, "bias": True}}},
           "data": {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "char"}},
           "train": {"steps": 12, "batch_size": 8, "lr": 0.01, "eval_every": 0, "log_every": 6, "seed": 1},
           "logging": {"runs_dir": str(tmp / "runs"), "progress": False, "plots": False},
           "sample": {"enabled": False}, "runtime": {"profile": "cpu"}}
    bp = tmp / "char.yaml"
    bp.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_main([str(bp)]) == 0
    (run,) = sorted(p.parent for p in (tmp / "runs").glob("*/*/blueprint.yaml"))
    return run


def test_char_run_exports_a_tokenizer_that_generates_like_sample(tmp_path, capsys):
    run = char_run(tmp_path)
    out = tmp_path / "export"
    capsys.readouterr()
    assert hf_main(["export", str(run), "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    prompt, n = "First Citizen:\nBe", 12
    assert sample_main([str(run), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0"]) == 0
    ours = capsys.readouterr().out
    pipe = transformers.pipeline("text-generation", model=str(out))
    got = pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert got + "\n" == ours and len(got) == len(prompt) + n

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    char = CharTokenizer(CORPUS)
    for text in (CORPUS[:120], " \n\n\t  :", "All:  Resolved.\n"):
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == char.encode(text)
        assert hf_tok.decode(ids) == text
    with pytest.raises(DataError):
        char.encode("Zebra")
    with pytest.raises(Exception, match="UNK"):           # refused by both, never a silent drop
        hf_tok("Zebra", add_special_tokens=False)


def bpe_tokenizer(vocab: int = 320) -> BpeTokenizer:
    text = CORPUS + "".join(TRICKY) * 3
    spec = BpeTokenizer.Spec(vocab_size=vocab)
    return BpeTokenizer.build(spec, Corpus(tuple(text[i:i + 200] for i in range(0, len(text), 200)), (), {}))


def tiny_llama(vocab: int):
    return build_model(build_model_spec({
        "vocab_size": vocab, "context_length": 32, "d_model": 32, "n_layers": 1, "tie_embeddings": False,
        "positional": {"kind": "rope"}, "block": {"norm": {"kind": "rmsnorm", "eps": 1e-5},
                                                  "attention": {"kind": "causal", "n_heads": 4},
                                                  "mlp": {"kind": "swiglu"}}}), seed=0).eval()


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_byte_level_tokenizers_export_and_encode_like_ours(tmp_path, capsys, kind):
    tok = bpe_tokenizer() if kind == "bpe" else ByteTokenizer()
    assert kind != "bpe" or tok.vocab_size > 300               # merges were learned
    out = export_hf(tiny_llama(tok.vocab_size), tok, tmp_path / "out")
    assert "note:" not in capsys.readouterr().err
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TRICKY:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == text
    if kind == "bpe":
        assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eot_id
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.config.eos_token_id == tok.eot_id


def test_a_tokenizer_the_library_cannot_represent_is_one_line_and_the_export_succeeds(tmp_path, capsys):
    import tiktoken
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256                          # no "ab" or "bc" token: not one merge of lower ranks
    tok = BpeTokenizer(tiktoken.Encoding("odd", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": 257}))
    out = export_hf(tiny_llama(tok.vocab_size), tok, tmp_path / "out")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note:") and "bpe tokenizer was not exported" in err
    assert "not one merge" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(DataError, match="not one merge"):
        write_hf_tokenizer(tok, tmp_path, 32)


def nanogpt_char_spec(positional=None, **block):
    """The model section of blueprints/nanogpt_cpu_char.yaml (65 characters), with ``block`` keys replaced."""
    model = yaml.safe_load((REPO / "blueprints" / "nanogpt_cpu_char.yaml").read_text())["model"]
    model["vocab_size"] = 65
    model["block"].update(block)
    if positional is not None:
        model["positional"] = positional
    return build_model_spec(model)


def test_the_refusal_names_the_closest_family_and_every_difference():
    for hint in (None, "llama"):                 # a family that refuses the structure never outranks gpt2
        with pytest.raises(HFError) as e:
            hf_family_for(nanogpt_char_spec(), hint)
        msg = str(e.value)
        assert "\n" not in msg and msg.index("closest: gpt2") < msg.index("difference")
        assert "4 differences" in msg and "llama" not in msg
        for item in ("model.final_norm.bias is False here, True in gpt2",
                     "model.layers[0-3].norm.bias is False here, True in gpt2",
                     "model.layers[0-3].mlp.bias is False here, True in gpt2",
                     "model.layers[0-3].attention.bias is [] here, ['k', 'o', 'q', 'v'] in gpt2"):
            assert item in msg
    # with the biases gpt2 has, it is exported as gpt2
    fam, config = hf_family_for(nanogpt_char_spec(norm={"kind": "layernorm"},
                                                  attention={"kind": "causal", "n_heads": 4, "bias": True},
                                                  mlp={"kind": "gelu", "hidden_size": 512, "bias": True}))
    assert fam.model_type == "gpt2" and config["n_layer"] == 4
    # no family holds rope + layernorm + gelu: the closest is a refusal, named as such
    with pytest.raises(HFError, match=r"closest: \w+ \(refuses its structure: the \w+ family"):
        hf_family_for(nanogpt_char_spec(positional={"kind": "rope"}))


def test_a_non_empty_folder_is_refused_and_left_alone(tmp_path):
    model = tiny_llama(64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HFError, match="exists and is not an empty folder"):
        export_hf(model, ByteTokenizer(), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HFError, match="not an empty folder"):
        export_hf(model, ByteTokenizer(), tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(model, ByteTokenizer(), empty)
    assert (empty / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "out"]     # no .tmp-* left


#: Runs the export command with the step that moves the finished folder into place held until SIGTERM.
HELD_EXPORT = """
import os, sys, time
from pathlib import Path
from nanodecoder.hf import convert
from nanodecoder.hf.__main__ import main
publish = convert._publish
def held(tmp, out):
    Path(sys.argv[3] + ".part").write_text(str(tmp))
    os.replace(sys.argv[3] + ".part", sys.argv[3])
    time.sleep(120)
    publish(tmp, out)
convert._publish = held
sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_an_export_killed_mid_write_leaves_nothing_loadable(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from evalhelpers import lm_raw, make_run_dir
    raw = lm_raw(tmp_path)
    raw["model"]["block"]["mlp"] = {"kind": "swiglu"}
    run = make_run_dir(tmp_path, raw)
    out, marker = tmp_path / "exported", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", HELD_EXPORT, str(run), str(out), str(marker)], cwd=REPO,
                            env=subprocess_env(tmp_path), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "export hung"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    partial = Path(marker.read_text())
    assert partial.name == f".tmp-exported-{proc.pid}" and partial.parent == tmp_path
    assert {"config.json", "model.safetensors"} <= {p.name for p in partial.iterdir()}   # it was all but done
    assert not out.exists()
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_main(["export", str(run), "--out", str(out)]) == 0
    assert not partial.exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert back(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
    assert os.listdir(out) and (out / "tokenizer.json").is_file()
