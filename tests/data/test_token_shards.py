"""The ``token_shards`` source: llm.c's .bin shards read in place as one token array per split."""
from __future__ import annotations

import numpy as np
import pytest

from nanodecoder.config import BlueprintError
from nanodecoder.data import BatchSampler, DataError, Prepared, ShardedTokens, prepare_data, unigram_loss
from nanodecoder.data.checks import token_counts
from nanodecoder.data.prepare import find_prepared
from nanodecoder.data.shards import HEADER_BYTES, ShardWriter, read_header, shard_name, write_shard
from nanodecoder.data.tokenizers import ByteTokenizer

SIZES = (37, 1, 64, 0, 50, 29)          # shard lengths: tiny, empty and uneven ones


def tokens_for(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2 ** 16, size=n).astype(np.uint16)


@pytest.fixture
def sharded(tmp_path):
    parts = [tokens_for(n, i) for i, n in enumerate(SIZES)]
    paths = [write_shard(tmp_path / shard_name("t", "train", i + 1), p) for i, p in enumerate(parts)]
    return ShardedTokens(paths), np.concatenate(parts)


def test_written_shards_have_llmc_headers(tmp_path):
    data = tokens_for(10)
    path = write_shard(tmp_path / "x_val_000000.bin", data)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 10] and not header[3:].any() and len(raw) == 1024 + 20
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"), data)
    assert read_header(path) == 10 and [p.name for p in tmp_path.iterdir()] == ["x_val_000000.bin"]
    with pytest.raises(DataError, match=r"must lie in \[0, 65536\)"):
        write_shard(tmp_path / "big.bin", np.array([1, 70000]))
    assert not (tmp_path / "big.bin").exists()


def test_sharded_tokens_behave_like_the_concatenated_array(sharded):
    tokens, flat = sharded
    assert len(tokens) == len(flat) == 181 and tokens.ndim == 1 and tokens.shape == (181,)
    assert tokens.dtype == np.uint16
    for T in (1, 5, 40, 100):                      # every window, many straddling 2 or more shards
        for s in range(0, len(flat) - T + 1):
            assert np.array_equal(tokens[s:s + T], flat[s:s + T]), (s, T)
    assert tokens[0] == flat[0] and tokens[-1] == flat[-1] and tokens[100] == flat[100]
    assert np.array_equal(tokens[170:500], flat[170:]) and len(tokens[200:300]) == 0
    assert np.array_equal(tokens[-20:], flat[-20:]) and np.array_equal(np.asarray(tokens), flat)
    with pytest.raises(IndexError):
        tokens[181]
    with pytest.raises(IndexError, match="step 1"):
        tokens[::2]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batches_over_shards_equal_batches_over_one_array(sharded, mode):
    tokens, flat = sharded
    a = BatchSampler(tokens, 3, 16, mode=mode, seed=4, rank=1, world_size=2)
    b = BatchSampler(flat, 3, 16, mode=mode, seed=4, rank=1, world_size=2)
    for _ in range(10):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.dtype == xb.dtype and (xa == xb).all() and (ya == yb).all()
    assert a.state_dict() == b.state_dict()


def test_unigram_counts_of_shards_match_and_large_splits_are_sampled(sharded):
    tokens, flat = sharded
    vocab = 2 ** 16
    assert np.array_equal(token_counts(tokens, vocab), np.bincount(flat, minlength=vocab))
    prep = Prepared(ByteTokenizer(), tokens, tokens, {}, None)
    prep_flat = Prepared(ByteTokenizer(), flat, flat, {}, None)
    assert unigram_loss(prep) == pytest.approx(unigram_loss(prep_flat))
    big = np.arange(5 << 20) % 7                        # beyond the limit: 2 evenly spaced 1M-token chunks
    counts = token_counts(big, 7, limit=2 << 20)
    assert counts.sum() == 2 << 20 and counts.min() > 0


@pytest.mark.parametrize("damage, message", [
    ("magic", "not a token shard (magic 12345, expected 20240520"),
    ("version", "token shard version 7, this nanodecoder reads version 1"),
    ("truncated", "the header says 100 tokens (1,224 bytes with the header) but the file has 1,124 bytes: truncated"),
    ("short", "10 bytes, too short for the 1024-byte header of a token shard"),
])
def test_bad_shards_are_one_line_errors_naming_the_file(tmp_path, damage, message):
    path = write_shard(tmp_path / "d_train_000001.bin", tokens_for(100))
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif damage == "version":
        raw[4:8] = np.array([7], dtype="<i4").tobytes()
    elif damage == "truncated":
        raw = raw[:-100]
    else:
        raw = raw[:10]
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_writer_fills_every_shard_but_the_last(tmp_path):
    w = ShardWriter(tmp_path, "w", 10)
    data = tokens_for(47)
    for part in np.array_split(data, 6):
        w.add(part)
    names = [p.name for p in w.close()]
    assert names == ["w_val_000000.bin"] + [f"w_train_{i:06d}.bin" for i in range(1, 5)]
    assert [read_header(tmp_path / n) for n in names] == [10, 10, 10, 10, 7]


def write_split_shards(folder, n_val=300, n_train=(400, 500)):
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "x_val_000000.bin", tokens_for(n_val, 9) % 256)
    for i, n in enumerate(n_train, start=1):
        write_shard(folder / f"x_train_{i:06d}.bin", tokens_for(n, i) % 256)


def test_the_source_reads_its_splits_in_place(tmp_path, cache, make_spec, gpt2_files, as_gpt2):
    write_split_shards(tmp_path / "shards")
    spec = make_spec({"kind": "token_shards", "path": "shards"},
                     {"kind": "tiktoken", "name": "gpt2", "files": str(gpt2_files)})
    prep = prepare_data(spec, base_dir=tmp_path)
    assert (len(prep.train), len(prep.val)) == (900, 300) and prep.manifest["n_tokens"] == {"train": 900, "val": 300}
    assert prep.manifest["n_bytes"] == {"train": None, "val": None} and prep.cache_dir == tmp_path / "shards"
    assert [p.name for p in prep.train.paths] == ["x_train_000001.bin", "x_train_000002.bin"]
    assert prep.tokenizer.kind == "tiktoken" and prep.tokenizer.vocab_size < 1000
    assert not cache.exists()                                     # nothing copied into the cache
    assert len(find_prepared(spec, base_dir=tmp_path).val) == 300
    glob_spec = make_spec({"kind": "token_shards", "path": "shards/*.bin", "train_pattern": "*_000002.bin",
                           "val_pattern": "*_000001.bin"},
                          {"kind": "tiktoken", "name": "gpt2", "files": str(gpt2_files)})
    prep = prepare_data(glob_spec, base_dir=tmp_path)
    assert (len(prep.train), len(prep.val)) == (500, 400)


def test_missing_or_incomplete_shard_folders(tmp_path, make_spec, gpt2_files):
    def problem(path, **extra):
        spec = make_spec({"kind": "token_shards", "path": path, **extra},
                         {"kind": "tiktoken", "name": "gpt2", "files": str(gpt2_files)})
        with pytest.raises(DataError) as e:
            spec.source.build(base_dir=tmp_path, cache_root=tmp_path).check()
        assert "\n" not in str(e.value)
        return str(e.value)
    assert problem("nowhere") == (f"data.source.path: the shard folder 'nowhere' does not exist (looked for "
                                  f"{tmp_path / 'nowhere'}); write it with tools/prepare_fineweb.py --out DIR")
    (tmp_path / "empty").mkdir()
    assert problem("empty") == ("data.source.train_pattern: no train shards matching '*_train_*.bin' in "
                                f"{tmp_path / 'empty'}")
    write_split_shards(tmp_path / "s")
    assert "data.source.val_pattern: no val shards matching 'nope*'" in problem("s", val_pattern="nope*")
    assert "matched no files" in problem("s/*.nothing")
    (tmp_path / "file.bin").write_bytes(b"")
    assert "is a regular file, not a folder of token shards" in problem("file.bin")


def test_a_damaged_shard_stops_preparation_with_its_name(tmp_path, make_spec, gpt2_files, as_gpt2):
    write_split_shards(tmp_path / "s")
    bad = tmp_path / "s" / "x_train_000002.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    spec = make_spec({"kind": "token_shards", "path": "s"}, {"kind": "tiktoken", "name": "gpt2",
                                                              "files": str(gpt2_files)})
    with pytest.raises(DataError, match=f"^{bad}: the header says 500 tokens"):
        prepare_data(spec, base_dir=tmp_path)


@pytest.mark.parametrize("tokenizer", [{"kind": "byte"}, {"kind": "tiktoken", "name": "cl100k_base"}])
def test_other_tokenizers_are_refused_by_validation(tmp_path, tokenizer, capsys):
    import yaml
    from nanodecoder.cli.blueprint import load_blueprint
    raw = {"model": {"context_length": 8, "d_model": 8, "n_layers": 1, "block": {"attention": {"kind": "causal",
                                                                                                "n_heads": 1}}},
           "data": {"source": {"kind": "token_shards", "path": "s"}, "tokenizer": tokenizer}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(BlueprintError) as e:
        load_blueprint(tmp_path / "b.yaml")
    text = str(e.value)
    assert "data.tokenizer (line" in text and "the token_shards source holds GPT-2 token ids: use {kind: tiktoken, " \
        "name: gpt2}" in text
