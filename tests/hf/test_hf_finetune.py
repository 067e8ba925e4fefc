"""An imported Hugging Face model end to end: import -> instruction-tune -> answer -> export -> transformers
generates the same answer; and what the import command reports (parameters, dtype, peak memory)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402

from nanodecoder.cli.run import main as run_main  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"},
           {"instruction": "Add", "input": "2 3", "output": "5"},
           {"instruction": "Sky color?", "output": "blue"},
           {"instruction": "Reverse", "input": "abc", "output": "cba"}]
TEMPLATE = {"prompt": "Q: {instruction}{input}\nA: ", "input": " [{input}]", "end": "\n"}
TEXT = ("The quick brown fox jumps over the lazy dog. Say hi, add two and three, what colour is the sky? "
        "Reverse the letters abc, then answer: hi there, 5, blue, cba.\n") * 20


def byte_bpe(folder, vocab: int = 300):
    """A small byte-level BPE (GPT-2's kind of tokenizer) trained here: every text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    return tok


def tiny_llama(folder):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      eos_token_id=0, bos_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(folder)
    return byte_bpe(folder)


def test_import_finetune_answer_export_round_trip(tmp_path, capsys, monkeypatch):
    from nanodecoder.cli.answer import main as answer_main
    monkeypatch.chdir(tmp_path)
    tok = tiny_llama(tmp_path / "hf")
    assert hf_main(["import", "hf", "--out", "imported"]) == 0
    (tmp_path / "inst.json").write_text(json.dumps(RECORDS))
    blueprint = {"extends": "imported/blueprint.yaml", "name": "sft",
                 "finetune": {"kind": "instruction", "from": "imported", "data": "inst.json",
                              "val_data": "inst.json", "template": TEMPLATE},
                 "train": {"steps": 150, "batch_size": 4, "lr": 3.0e-3, "seed": 1, "eval_every": 0,
                           "log_every": 50, "checkpoint_every": 0, "keep_best": False,
                           "schedule": {"kind": "constant", "warmup_steps": 5}},
                 "logging": {"runs_dir": "runs"}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(blueprint))
    assert run_main(["sft.yaml"]) == 0
    (run,) = (tmp_path / "runs" / "sft").iterdir()
    capsys.readouterr()
    for rec in RECORDS:                      # the imported model learnt the responses, through its own tokenizer
        assert answer_main([str(run), rec["instruction"], "--input", rec.get("input", "")]) == 0
        assert capsys.readouterr().out == rec["output"] + "\n"

    assert hf_main(["export", str(run), "--out", "exported", "--checkpoint", "latest"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "exported" / "tokenizer.json"))
    prompt = TEMPLATE["prompt"].format(instruction="Add", input=TEMPLATE["input"].format(input="2 3"))
    ids = torch.tensor([hf_tok.encode(prompt)])
    assert ids.tolist()[0] == tok.encode(prompt).ids
    out = back.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert hf_tok.decode(out[0, ids.size(1):]).startswith("5\n")


def test_import_reports_its_memory_and_keeps_the_asked_dtype(tmp_path, capsys):
    tiny_llama(tmp_path / "hf")
    assert hf_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    params = sum(t.numel() for t in transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").parameters())
    info = json.loads((tmp_path / "a" / "run.json").read_text())["imported_from"]
    assert info["parameters"] == params and info["dtype"] == "float32" and info["weights_bytes"] == 4 * params
    assert "parameters" in out and "of float32 weights" in out and "peak memory of the import" in out

    assert hf_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    assert "of bfloat16 weights" in capsys.readouterr().out
    (ckpt,) = (tmp_path / "b" / "ckpt").glob("step_*")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    # --dtype keep: the files' own dtype (here a bf16 copy of the model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf16")
    (tmp_path / "hf16" / "tokenizer.json").write_bytes((tmp_path / "hf" / "tokenizer.json").read_bytes())
    assert hf_main(["import", str(tmp_path / "hf16"), "--out", str(tmp_path / "c"), "--dtype", "keep"]) == 0
    assert json.loads((tmp_path / "c" / "run.json").read_text())["imported_from"]["dtype"] == "bfloat16"
