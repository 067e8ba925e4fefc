"""GPT-2's Hugging Face vocab.json + merges.txt -> tiktoken ranks, offline: against a byte-level BPE trained here."""
from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from nanodecoder.config.declare import build  # noqa: E402
from nanodecoder.data import DataError, DataSpec, load_tokenizer  # noqa: E402
from nanodecoder.data import hf_bpe  # noqa: E402
from nanodecoder.data.bpe import TiktokenTokenizer  # noqa: E402
from nanodecoder.data.hf_bpe import (BYTE_CHARS, encoding_from_files, gpt2_mismatch, read_files,  # noqa: E402
                                     token_bytes, write_files)
from nanodecoder.data.kinds import data_catalog, tokenizer_vocab_size  # noqa: E402

CORPUS = """The quick brown fox jumps over the lazy dog. It's a test; we'll see what they've done, don't you think?
Numbers: 0 1 12 123 1234 12345 3.14159 2,718 1e-5 and 42nd street, 1999-2024.
def tokenize(text):\n    return [t for t in text.split()  if t]   # two  spaces\n\n\n\tTabbed line\n
Unicode: naïve café, Ünïcödé, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية.
Emoji: 🎉🎉 👍🏽 ❤️ 🇫🇷 — dashes – and “quotes” ‘single’ … ellipsis.
""" * 12

TEXTS = [
    "Hello world, it's 2024!",
    "  leading and trailing spaces   ",
    "multiple   spaces\n\n\n\ttabs\t\t and \r\n windows lines \n",
    "ünïcödé — naïve café 日本語 русский Ελληνικά 🎉👍🏽❤️🇫🇷 \u200b zero width",
    "I'll we've they're don't She'd I'm it's O'Neil'S 'quoted'",
    "12345 3.14159 1,000,000 0x1F 2e10 ١٢٣ ½",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "words the model never saw: xylophone quixotic zzzz ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    " ", "\n", "a  \nb", "trailing   ", "",
]


def train_bpe(folder, vocab_size=700):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    return tok


@pytest.fixture
def bpe_dir(tmp_path):
    return tmp_path / "bpe", train_bpe(tmp_path / "bpe")


def test_byte_table_is_gpt2s():
    assert BYTE_CHARS[ord(" ")] == "Ġ" and BYTE_CHARS[ord("\n")] == "Ċ" and BYTE_CHARS[ord("!")] == "!"
    assert len(set(BYTE_CHARS)) == 256 and token_bytes("ĠĠĊ") == b"  \n"
    assert [b for b in hf_bpe.GPT2_BYTE_ORDER[:3]] == [ord("!"), ord('"'), ord("#")]


def test_converted_encoding_matches_the_hf_tokenizer(bpe_dir):
    folder, hf = bpe_dir
    enc = encoding_from_files(folder, "small")
    assert enc.n_vocab == hf.get_vocab_size() and enc._special_tokens == {"<|endoftext|>": 0}
    assert enc._pat_str == hf_bpe.GPT2_PATTERN
    for text in TEXTS + [CORPUS[:3000]]:
        ids = enc.encode_ordinary(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert enc.decode(ids) == hf.decode(ids) == text
    mixed = "a<|endoftext|>b"                           # special tokens only where asked for
    assert enc.encode(mixed, allowed_special="all") == hf.encode(mixed).ids
    assert 0 not in enc.encode_ordinary(mixed)


def test_write_files_gives_back_the_same_files(bpe_dir, tmp_path):
    folder, _ = bpe_dir
    write_files(encoding_from_files(folder, "small"), tmp_path / "back")
    assert (tmp_path / "back" / "merges.txt").read_text() == (folder / "merges.txt").read_text()
    assert json.loads((tmp_path / "back" / "vocab.json").read_text()) == json.loads((folder / "vocab.json").read_text())


def test_a_small_vocabulary_is_not_gpt2(bpe_dir):
    folder, hf = bpe_dir
    n = hf.get_vocab_size()
    assert 400 < n < 50257 and f"it has {n} tokens, GPT-2 has 50257" in gpt2_mismatch(encoding_from_files(folder, "gpt2"))
    with pytest.raises(DataError, match="not GPT-2's vocabulary"):
        hf_bpe.gpt2_from_files(folder)


def _break(folder, case):
    merges, vocab = folder / "merges.txt", folder / "vocab.json"
    lines = merges.read_text().split("\n")
    if case == "missing_merges":
        merges.unlink()
        return "merges.txt: missing"
    if case == "malformed_line":
        lines[5] = lines[5].replace(" ", "")
        merges.write_text("\n".join(lines))
        return "merges.txt line 6: expected two tokens separated by one space"
    if case == "unknown_part":
        lines[3] = "Ω " + lines[3].split(" ")[1]
        merges.write_text("\n".join(lines))
        return "merges.txt line 4: 'Ω' is not a token of vocab.json"
    if case == "unreachable":                    # drop a merge: its token can no longer be made
        gone = lines.pop(7)
        merges.write_text("\n".join(lines))
        return f"token {gone.replace(' ', '')!r} (id"
    if case == "order":                          # two merges swapped: ids no longer follow the merge order
        lines[4], lines[5] = lines[5], lines[4]
        merges.write_text("\n".join(lines))
        return "merges.txt line 6: the merge gives id"
    if case == "bad_json":
        vocab.write_text('{\n"a": 0,\n"b" 1\n}')
        return "vocab.json line 3: not valid JSON"
    if case == "missing_byte":
        v = json.loads(vocab.read_text())
        v = {t: i for t, i in v.items() if t != "Ċ"}
        vocab.write_text(json.dumps(v, indent=1))
        return "vocab.json: ids must be 0.."
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_merges", "malformed_line", "unknown_part", "unreachable", "order",
                                  "bad_json", "missing_byte"])
def test_bad_files_are_one_line_naming_file_and_line(bpe_dir, case):
    folder, _ = bpe_dir
    message = _break(folder, case)
    with pytest.raises(DataError) as e:
        read_files(folder)
    msg = str(e.value)
    assert message in msg and "\n" not in msg and str(folder) in msg
    if case == "unreachable":
        assert "vocab.json line " in msg and "not made by any merge of merges.txt (unreachable)" in msg


def test_tiktoken_kind_builds_gpt2_from_files_offline(bpe_dir, tmp_path, monkeypatch):
    import tiktoken
    folder, hf = bpe_dir
    monkeypatch.setattr(hf_bpe, "gpt2_mismatch", lambda enc: None)   # the small vocabulary stands in for GPT-2's
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("files: must not ask tiktoken's cache"))
    spec = build(DataSpec, {"source": {"kind": "text", "path": "x.txt"},
                            "tokenizer": {"kind": "tiktoken", "name": "gpt2", "files": str(folder)}}, data_catalog())
    assert tokenizer_vocab_size(spec) == hf.get_vocab_size()
    tok = spec.tokenizer.impl.build(spec.tokenizer, None)
    assert isinstance(tok, TiktokenTokenizer) and tok.encoding.name == "gpt2" and tok.eot_id == 0
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.encoding.name == "gpt2" and back.encode(TEXTS[3]) == tok.encode(TEXTS[3])


def test_files_is_only_for_gpt2_and_bad_folders_are_named(bpe_dir, tmp_path):
    from nanodecoder.cli.blueprint import RunSpec  # noqa: F401  (the catalog of a whole blueprint)
    from nanodecoder.config import BlueprintError
    from nanodecoder.cli.blueprint import load_blueprint
    folder, _ = bpe_dir
    bp = tmp_path / "bp.yaml"
    bp.write_text("model: {vocab_size: auto, context_length: 8, d_model: 8, n_layers: 1, block: {attention: "
                  "{kind: causal, n_heads: 1}, mlp: {kind: gelu}}}\n"
                  f"data: {{source: {{kind: text, path: x.txt}}, tokenizer: {{kind: tiktoken, name: cl100k_base, "
                  f"files: {folder}}}}}\n")
    with pytest.raises(BlueprintError, match="data.tokenizer.files.*only the gpt2 encoding"):
        load_blueprint(bp)
    spec = build(DataSpec, {"source": {"kind": "text", "path": "x.txt"},
                            "tokenizer": {"kind": "tiktoken", "name": "gpt2", "files": str(tmp_path / "nowhere")}},
                 data_catalog())
    with pytest.raises(DataError, match=r"^data.tokenizer.files: .*nowhere/vocab.json: missing"):
        tokenizer_vocab_size(spec)


def test_relative_tokenizer_files_start_at_the_blueprints_folder(tmp_path, monkeypatch):
    from nanodecoder.cli.blueprint import load_blueprint
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    bp = tmp_path / "exp" / "bp.yaml"
    bp.write_text("model: {vocab_size: auto, context_length: 8, d_model: 8, n_layers: 1, block: {attention: "
                  "{kind: causal, n_heads: 1}, mlp: {kind: gelu}}}\n"
                  "data: {source: {kind: text, path: x.txt}, tokenizer: {kind: tiktoken, name: gpt2, "
                  "files: ../gpt2_files}}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    raw = load_blueprint(bp).raw
    assert raw["data"]["tokenizer"]["files"] == str(tmp_path / "gpt2_files")
    assert raw["data"]["source"]["path"] == "x.txt"         # sources resolve against base_dir themselves
