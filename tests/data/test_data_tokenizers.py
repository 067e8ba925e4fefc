"""Tokenizers: round trips, save/load without data or network, clear errors."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nanodecoder.data import BpeTokenizer, ByteTokenizer, CharTokenizer, DataError, TiktokenTokenizer, load_tokenizer
from nanodecoder.data.bpe import EOT_TEXT, RANKS_FILE, get_named_encoding
from nanodecoder.data.prepare import text_pieces
from nanodecoder.data.sources import Corpus

TRAIN = Path(textwrap.__file__).read_text(encoding="utf-8") + "Ünïcödé: naïve café, 日本語のテキスト, 😀🎉.\n" * 20
CORPUS = Corpus(train=(TRAIN,), val=("print(add(1, 2))\n",), info={})
TRICKY = ["", "héllo wörld\n", "日本語 😀 \t\r\n tabs", f"literal {EOT_TEXT} inside", "\x00\x7f\u200b", "a" * 500]


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.build(BpeTokenizer.Spec(vocab_size=400), CORPUS)


def test_byte_round_trips_any_text():
    tok = ByteTokenizer()
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert (tok.vocab_size, tok.eot_id) == (256, None)


def test_bpe_has_the_requested_vocab_with_eot_last_and_round_trips(bpe):
    assert bpe.vocab_size == 400 and bpe.eot_id == 399
    for text in TRICKY + [TRAIN]:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(TRAIN)) < len(TRAIN.encode()) / 1.5     # it learned merges
    assert bpe.eot_id not in bpe.encode(f"x {EOT_TEXT} y")          # special text is plain text
    assert bpe.decode([bpe.eot_id]) == EOT_TEXT


def test_bpe_training_is_deterministic(bpe):
    again = BpeTokenizer.build(BpeTokenizer.Spec(vocab_size=400), CORPUS)
    assert again.encoding._mergeable_ranks == bpe.encoding._mergeable_ranks


def test_bpe_on_a_tiny_corpus_gives_fewer_tokens_never_more():
    tok = BpeTokenizer.build(BpeTokenizer.Spec(vocab_size=5000), Corpus(("abab abab",), ("ab",), {}))
    assert 257 <= tok.vocab_size < 5000 and tok.eot_id == tok.vocab_size - 1


def test_char_vocabulary_is_the_corpus_characters_and_new_ones_are_refused():
    tok = CharTokenizer.build(CharTokenizer.Spec(), Corpus(("hello\n",), ("wörld",), {}))
    assert tok.chars == sorted(set("hello\nwörld"))
    assert tok.decode(tok.encode("wörld\nhello")) == "wörld\nhello"
    assert tok.eot_id is None
    with pytest.raises(DataError, match=r"character 'z' \(U\+007A\) is not in the char tokenizer's vocabulary"):
        tok.encode("hez")
    with pytest.raises(DataError, match="outside the char tokenizer's vocabulary"):
        tok.decode([0, tok.vocab_size])


@pytest.mark.parametrize("make", [
    lambda bpe: ByteTokenizer(),
    lambda bpe: CharTokenizer("abc\n日"),
    lambda bpe: bpe,
])
def test_save_and_load_restore_the_same_tokenizer(tmp_path, regs, bpe, make):
    tok = make(bpe)
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok", catalog=regs)
    assert type(back) is type(tok)
    assert (back.vocab_size, back.eot_id) == (tok.vocab_size, tok.eot_id)
    text = "abc\n日" if isinstance(tok, CharTokenizer) else "héllo 日本 " + TRAIN[:200]
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == text


def test_loading_a_damaged_or_missing_tokenizer_is_a_clear_error(tmp_path, regs, bpe):
    with pytest.raises(DataError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "nothing", catalog=regs)
    bpe.save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"kind": "bpe"}')
    with pytest.raises(DataError, match="missing field 'pattern'"):
        load_tokenizer(tmp_path / "tok", catalog=regs)
    bpe.save(tmp_path / "tok")
    (tmp_path / "tok" / RANKS_FILE).write_text("not base64!! 1\n")
    with pytest.raises(DataError, match="unreadable tokenizer ranks"):
        load_tokenizer(tmp_path / "tok", catalog=regs)
    (tmp_path / "tok" / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(DataError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(tmp_path / "tok", catalog=regs)


def test_unknown_tiktoken_name_suggests_the_closest():
    with pytest.raises(DataError, match="unknown tiktoken encoding 'cl100k'; did you mean 'cl100k_base'"):
        get_named_encoding("cl100k")


def test_offline_tiktoken_says_how_to_provide_the_file(tmp_path, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry

    fetched = []

    def no_network(url):
        fetched.append(url)
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(DataError) as e:
        TiktokenTokenizer.build(TiktokenTokenizer.Spec(name="gpt2"), CORPUS)
    msg = str(e.value)
    assert "\n" not in msg and "not in tiktoken's cache" in msg and "TIKTOKEN_CACHE_DIR" in msg
    assert str(tmp_path / "empty-cache") in msg and fetched    # it looked, and failed without a traceback


def test_named_tiktoken_encoding_is_saved_whole_and_loads_offline(tmp_path, regs, bpe, monkeypatch):
    import tiktoken

    fake = tiktoken.Encoding("gpt2", pat_str=bpe.encoding._pat_str, mergeable_ranks=bpe.encoding._mergeable_ranks,
                             special_tokens={EOT_TEXT: 399})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = TiktokenTokenizer.build(TiktokenTokenizer.Spec(name="gpt2"), CORPUS)
    assert TiktokenTokenizer.known_vocab_size(TiktokenTokenizer.Spec(name="gpt2")) == 400
    assert (tok.vocab_size, tok.eot_id) == (400, 399)
    tok.save(tmp_path / "tok")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("loading must not fetch"))
    back = load_tokenizer(tmp_path / "tok", catalog=regs)
    assert isinstance(back, TiktokenTokenizer) and back.encoding.name == "gpt2"
    for text in TRICKY:
        assert back.decode(back.encode(text)) == text
        assert back.encode(text) == tok.encode(text)


def test_long_documents_encode_in_pieces_exactly_as_whole(bpe):
    doc = TRAIN * 3 + "no newline at the end " * 50
    pieces = text_pieces(doc, limit=700)
    assert len(pieces) > 5 and "".join(pieces) == doc
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert [t for p in pieces for t in bpe.encode(p)] == bpe.encode(doc)
    assert text_pieces("abc", limit=700) == ["abc"] and text_pieces("", limit=10) == []
