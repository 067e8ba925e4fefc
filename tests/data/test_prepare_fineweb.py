"""``tools/prepare_fineweb.py`` offline: local parquet and JSONL files through ``datasets`` (the path the Hub
dataset takes, streaming) -> llm.c .bin shards -> the ``token_shards`` source -> a short training run and the
speedrun blueprint's dry run.

GPT-2's own vocab.json/merges.txt cannot be downloaded here: the ``gpt2_files`` stand-in (a small byte-level
BPE, <|endoftext|> = 0) goes through the same ``--tokenizer-files`` / ``files:`` code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

from nanodecoder.cli import prepare_fineweb as tool  # noqa: E402
from nanodecoder.config.declare import build  # noqa: E402
from nanodecoder.data import DataSpec, ShardedTokens, prepare_data  # noqa: E402
from nanodecoder.data.hf_bpe import gpt2_from_files  # noqa: E402
from nanodecoder.data.shards import HEADER_BYTES, MAGIC, VERSION  # noqa: E402
from nanodecoder.data.kinds import data_catalog  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HELLASWAG = ROOT / "tests" / "eval" / "hellaswag_tiny.jsonl"
WORDS = "the a fox dog jumps over lazy quick brown naïve café Straße 日本語 🎉 don't 42 3.14\n".split(" ")


def make_docs(n: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 25)))) for _ in range(n)]
    docs[5] = ""                                          # an empty document still gets its <|endoftext|>
    docs[7] = "a literal <|endoftext|> in the text is ordinary characters"
    docs[9] = "  spaces\n\n\ttabs  \r\n"
    return docs


@pytest.fixture
def env(tmp_path, gpt2_files, as_gpt2, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    docs = make_docs()
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "docs.parquet")
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "meta": {"i": i}}, ensure_ascii=False) + "\n")
    enc = gpt2_from_files(gpt2_files)
    eot = enc._special_tokens["<|endoftext|>"]
    expected = np.array([t for d in docs for t in [eot, *enc.encode_ordinary(d)]], dtype=np.uint16)
    return tmp_path, gpt2_files, docs, expected


def prepare(tmp: Path, files: Path, data: str, out: str = "out", *extra: str) -> int:
    return tool.main(["--data-files", str(tmp / data), "--out", str(tmp / out), "--tokenizer-files", str(files),
                      "--no-progress", *extra])


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    return np.frombuffer(raw[:HEADER_BYTES], dtype="<i4"), np.frombuffer(raw[HEADER_BYTES:], dtype="<u2")


def source_spec(path: Path, files: Path) -> DataSpec:
    return build(DataSpec, {"source": {"kind": "token_shards", "path": str(path)},
                            "tokenizer": {"kind": "tiktoken", "name": "gpt2", "files": str(files)}}, data_catalog())


def test_parquet_to_shards_in_llmc_format_read_back_exactly(env, capsys):
    tmp, files, docs, expected = env
    assert prepare(tmp, files, "docs.parquet", "out", "--shard-size", "1000", "--docs-per-batch", "7") == 0
    assert f"wrote {len(expected):,} tokens" in capsys.readouterr().out
    shards = sorted((tmp / "out").iterdir())
    n = -(-len(expected) // 1000)
    assert [p.name for p in shards] == [f"tokens_train_{i:06d}.bin" for i in range(1, n)] + ["tokens_val_000000.bin"]
    ordered = [tmp / "out" / "tokens_val_000000.bin"] + shards[:-1]
    got = []
    for i, p in enumerate(ordered):
        h, tokens = read_shard(p)
        assert h[0] == MAGIC == 20240520 and h[1] == VERSION == 1 and (h[3:] == 0).all()
        assert h[2] == len(tokens) == (1000 if i < n - 1 else len(expected) - 1000 * (n - 1))
        got.append(tokens)
    assert np.array_equal(np.concatenate(got), expected)
    prep = prepare_data(source_spec(tmp / "out", files), base_dir=tmp)     # the data source reads the same tokens
    assert isinstance(prep.train, ShardedTokens) and len(prep.val) == 1000
    assert np.array_equal(np.asarray(prep.val[:]), expected[:1000])
    assert np.array_equal(np.asarray(prep.train[:]), expected[1000:])
    assert np.array_equal(prep.train[990:1020], expected[1990:2020])       # a window across two shards
    assert prep.tokenizer.decode(expected[:40].tolist()).startswith("<|endoftext|>" + docs[0])


def test_jsonl_with_workers_and_max_tokens_gives_the_same_tokens(env):
    tmp, files, _, expected = env
    assert prepare(tmp, files, "docs.jsonl", "a", "--shard-size", "700") == 0
    assert prepare(tmp, files, "docs.jsonl", "b", "--shard-size", "700", "--workers", "2",
                   "--docs-per-batch", "16") == 0
    for a in sorted((tmp / "a").iterdir()):
        assert a.read_bytes() == (tmp / "b" / a.name).read_bytes()
    assert prepare(tmp, files, "docs.jsonl", "c", "--shard-size", "700", "--max-tokens", "2100") == 0
    names = sorted(p.name for p in (tmp / "c").iterdir())
    assert names == ["tokens_train_000001.bin", "tokens_train_000002.bin", "tokens_val_000000.bin"]
    tokens = np.concatenate([read_shard(tmp / "c" / n)[1] for n in (names[2], names[0], names[1])])
    assert np.array_equal(tokens, expected[:2100])


def test_a_glob_of_files_is_read_in_name_order(env):
    tmp, files, docs, expected = env
    for i, part in enumerate((docs[:100], docs[100:])):
        with open(tmp / f"part{i}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    assert tool.main(["--data-files", str(tmp / "part*.jsonl"), "--out", str(tmp / "g"), "--shard-size", "1000",
                      "--tokenizer-files", str(files), "--no-progress", "--prefix", "mix"]) == 0
    prep = prepare_data(source_spec(tmp / "g", files), base_dir=tmp)
    assert np.array_equal(np.concatenate([prep.val[:], prep.train[:]]), expected)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_clear_errors(env, capsys, monkeypatch):
    tmp, files, _, _ = env
    assert prepare(tmp, files, "missing.parquet") == 2
    assert one_line_error(capsys) == f"error: --data-files: {tmp / 'missing.parquet'}: no such file"
    assert prepare(tmp, files, "nothing*.jsonl") == 2
    assert "matched no files" in one_line_error(capsys)
    assert prepare(tmp, files, "docs.parquet", "out", "--text-field", "content") == 2
    err = one_line_error(capsys)
    assert "record 0 has no field 'content' (its fields: id, text)" in err and "--text-field" in err
    (tmp / "notes.txt").write_text("x")
    assert prepare(tmp, files, "notes.txt") == 2
    assert "not a .parquet, .json or .jsonl file" in one_line_error(capsys)
    assert tool.main(["--data-files", str(tmp / "docs.jsonl"), "--no-progress"]) == 2
    assert "--out DIR is needed" in one_line_error(capsys)
    assert prepare(tmp, files, "docs.jsonl", "out", "--shard-size", "1000") == 0
    capsys.readouterr()
    assert prepare(tmp, files, "docs.jsonl", "out", "--shard-size", "1000") == 2   # no silent mixing of old shards
    err = one_line_error(capsys)
    assert "already holds 6 'tokens' shard(s)" in err and "--overwrite" in err
    assert prepare(tmp, files, "docs.jsonl", "out", "--shard-size", "5000", "--overwrite") == 0
    assert sorted(p.name for p in (tmp / "out").iterdir())[-1] == "tokens_val_000000.bin"
    assert len(list((tmp / "out").iterdir())) == 2
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "datasets", None)                     # not installed
    assert prepare(tmp, files, "docs.jsonl", "new") == 2
    assert "pip install '.[fineweb]'" in one_line_error(capsys)
    assert not (tmp / "new").exists()


def test_without_tokenizer_files_offline_the_error_names_the_option(env, capsys, monkeypatch):
    import tiktoken
    tmp, _, _, _ = env

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert tool.main(["--data-files", str(tmp / "docs.jsonl"), "--out", str(tmp / "o"), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "tiktoken encoding 'gpt2' is not in tiktoken's cache" in err and "give --tokenizer-files" in err


def test_an_interrupted_run_leaves_only_complete_shards(env, capsys, monkeypatch):
    tmp, files, docs, expected = env
    enc = gpt2_from_files(files)
    full = sum(1 + len(enc.encode_ordinary(d)) for d in docs[:200]) // 1000    # shards complete at the interrupt
    real = tool.documents

    def interrupted(*args):
        for i, doc in enumerate(real(*args)):
            if i == 200:
                raise KeyboardInterrupt
            yield doc
    monkeypatch.setattr(tool, "documents", interrupted)
    assert prepare(tmp, files, "docs.jsonl", "out", "--shard-size", "1000", "--docs-per-batch", "10") == 130
    assert "interrupted" in capsys.readouterr().err
    written = sorted((tmp / "out").iterdir())
    assert full >= 3 and [p.name for p in written] == (                     # no partial shard, no temporary file
        [f"tokens_train_{i:06d}.bin" for i in range(1, full)] + ["tokens_val_000000.bin"])
    assert np.array_equal(read_shard(written[0])[1], expected[1000:2000])


def test_training_on_the_shards_end_to_end(env, capsys):
    from nanodecoder.cli.run import main
    tmp, files, _, _ = env
    assert prepare(tmp, files, "docs.parquet", "shards", "--shard-size", "2000") == 0
    raw = {
        "name": "shards_tiny",
        "model": {"context_length": 32, "d_model": 32, "n_layers": 1, "dropout": 0.0,
                  "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}},
        "data": {"source": {"kind": "token_shards", "path": "shards"},
                 "tokenizer": {"kind": "tiktoken", "name": "gpt2", "files": str(files)}, "sampling": "sequential"},
        "train": {"steps": 4, "batch_size": 4, "lr": 0.01, "eval_every": 2, "eval_steps": 2, "log_every": 1,
                  "checkpoint_every": 0, "seed": 1, "schedule": {"kind": "cosine", "warmup_steps": 1}},
        "eval": {"hellaswag": {"data": str(HELLASWAG), "every": 4}},
        "logging": {"runs_dir": str(tmp / "runs"), "progress": False, "plots": False},
        "sample": {"max_new_tokens": 4, "prompt": "the"},
        "runtime": {"profile": "cpu"},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(tmp / "tiny.yaml")]) == 0
    (run,) = (tmp / "runs" / "shards_tiny").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("hellaswag_acc" in r for r in rows)
    assert sum(1 for r in rows if "loss" in r and "val_loss" not in r) >= 4


def test_the_speedrun_blueprint_dry_runs_on_the_test_shards(env, capsys):
    from nanodecoder.cli.run import main
    tmp, files, _, _ = env
    assert prepare(tmp, files, "docs.parquet", "shards", "--shard-size", "2000") == 0
    capsys.readouterr()
    bp = ROOT / "blueprints" / "speedrun" / "gpt2_124m_fineweb.yaml"
    sets = [f"data.source.path={tmp / 'shards'}", f"data.tokenizer.files={files}", f"eval.hellaswag.data={HELLASWAG}",
            f"logging.runs_dir={tmp / 'runs'}"]
    assert main([str(bp), "--dry-run", "--profile", "cpu", "--set", *sets, "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "124,475,904" in out and "19,073 steps" in out
    assert "2,000 val tokens" in out and "tokens (" in out
    # the default folder is missing here: one line says so, after the plan
    assert main([str(bp), "--dry-run", "--profile", "cpu", "--set", f"data.tokenizer.files={files}",
                 f"eval.hellaswag.data={HELLASWAG}", f"logging.runs_dir={tmp / 'runs'}", "train.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.source.path: the shard folder '../../data/edu_fineweb10B' does not exist")
    assert "tools/prepare_fineweb.py" in err and "\n" not in err.strip()


def test_documents_are_joined_after_end_of_text_and_must_fit_uint16():
    assert tool.join_documents([[5, 6], [], [7]], 9).tolist() == [9, 5, 6, 9, 9, 7]
    with pytest.raises(tool.DataError, match=r"must lie in \[0, 65536\)"):
        tool.join_documents([[1, 65536]], 0)


def test_the_speedrun_dry_run_offline_lists_each_missing_piece(tmp_path, capsys, monkeypatch):
    """No shards, no HellaSwag file, no tiktoken cache: the plan is still printed, then one line per problem."""
    import tiktoken
    from nanodecoder.cli.run import main

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    bp = ROOT / "blueprints" / "speedrun" / "gpt2_124m_fineweb.yaml"
    assert main([str(bp), "--dry-run", "--set", f"logging.runs_dir={tmp_path / 'runs'}"]) == 2
    captured = capsys.readouterr()
    assert "19,073 steps x 524,288 tokens/step" in captured.out and "memory plan per process" in captured.out
    problems = captured.err.splitlines()[1:]
    assert any(p.strip().startswith("data.source.path: the shard folder") for p in problems)
    assert any(p.strip().startswith("eval.hellaswag.data:") for p in problems)
    assert any("tiktoken encoding 'gpt2' is not in tiktoken's cache" in p for p in problems)
