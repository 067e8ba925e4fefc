"""Our tokenizers as a Hugging Face fast tokenizer: ``tokenizer.json`` + ``tokenizer_config.json``, so that
``AutoTokenizer.from_pretrained(folder)`` (and ``pipeline("text-generation", model=folder)``) encode and
decode like we do.  Built with the ``tokenizers`` library (``pip install 'nanodecoder[hf]'``):

``char``               a WordLevel model over the corpus's characters, every character its own piece (a Split
                       on ``[\\s\\S]``, no normaliser) and a decoder that joins them (Fuse): spaces, tabs and
                       newlines come back exactly; a character outside the vocabulary is refused (there is no
                       unknown token), as ours refuses it.
``byte``               byte-level BPE with the 256 one-byte tokens (id = byte value) and no merges.
``bpe``, ``tiktoken``  byte-level BPE: the encoding's split pattern (Split), GPT-2's byte-to-character table
                       (ByteLevel), the ranks as ids, each token's merge from ``hf_bpe.merges_of`` and
                       ``ignore_merges`` (a piece that is a token stays whole, as tiktoken does); the special
                       tokens are added tokens with their own ids.

Each built tokenizer must give our ids for a check text and decode them back before it is written; what the
library cannot represent is a :class:`DataError` saying why.  Like Hugging Face's own tokenizers (and unlike
our ``encode``), the written one reads a special token's spelling in the text as that special token.
"""
from __future__ import annotations

import json
from pathlib import Path

from .bpe import RanksTokenizer
from .errors import DataError
from .hf_bpe import merges_of, token_text
from .hf_tokenizer import HF_CONFIG
from .tokenizers import ByteTokenizer, CharTokenizer

try:
    import tokenizers
except ImportError:            # optional: pip install 'nanodecoder[hf]'
    tokenizers = None

TOKENIZER_FILE = "tokenizer.json"
#: Text on which an exported byte-level tokenizer must give our ids (and decode back): words, contractions,
#: digits, runs of spaces, tabs, CR/LF, accents, CJK, emoji with modifiers, a zero-width space.
CHECK_TEXT = ("The quick brown fox, isn't it? They'll say 'no'... 12345 + 3.14 = 0x1F\n\n\tdef f(x):  return x  \r\n"
              "naïve café Ünïcödé — 日本語 русский 🎉👍🏽❤️🇫🇷 \u200b end   \n ")


def _check(ours, theirs, text: str) -> None:
    want = ours.encode(text)
    got = theirs.encode(text, add_special_tokens=False).ids
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise DataError(f"the tokenizers library encodes the check text differently from our {ours.kind} tokenizer "
                        f"(first at token {at}: {got[at:at + 3]} instead of {want[at:at + 3]})")
    back = theirs.decode(got, skip_special_tokens=False)
    if back != ours.decode(want):
        raise DataError(f"the tokenizers library decodes our {ours.kind} tokenizer's ids to other text")


def _char(tok: CharTokenizer):
    m = tokenizers
    t = m.Tokenizer(m.models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
    t.pre_tokenizer = m.pre_tokenizers.Split(m.Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = m.decoders.Fuse()
    return t, "".join(tok.chars)


def _byte_level(ranks: dict[bytes, int], specials: dict[str, int], pattern: str | None):
    m = tokenizers
    vocab = {token_text(data): i for data, i in ranks.items()}
    clash = sorted(set(vocab) & set(specials))
    if clash:
        raise DataError(f"special token {clash[0]!r} is also spelled by a byte-level token")
    merges = [(token_text(a), token_text(b)) for a, b in merges_of(ranks)]
    t = m.Tokenizer(m.models.BPE({**vocab, **specials}, merges, ignore_merges=True))
    byte_level = m.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if pattern is None:
        t.pre_tokenizer = byte_level
    else:
        try:
            split = m.pre_tokenizers.Split(m.Regex(pattern), behavior="isolated")
        except Exception as e:  # the library raises its own Exception for a pattern Oniguruma cannot read
            raise DataError(f"the split pattern is not one the tokenizers library reads ({e})") from None
        t.pre_tokenizer = m.pre_tokenizers.Sequence([split, byte_level])
    t.decoder = m.decoders.ByteLevel()
    t.add_special_tokens([m.AddedToken(s, special=True, normalized=False) for s in specials])
    return t, CHECK_TEXT


def hf_tokenizer(tok):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like ``tok`` (checked); a DataError says why there
    is none."""
    if not isinstance(tok, (CharTokenizer, ByteTokenizer, RanksTokenizer)):
        raise DataError(f"the {tok.kind} tokenizer has no Hugging Face tokenizer.json form")
    if tokenizers is None:
        raise DataError("writing tokenizer.json needs the 'tokenizers' package: pip install 'nanodecoder[hf]'")
    if isinstance(tok, CharTokenizer):
        built, text = _char(tok)
    elif isinstance(tok, ByteTokenizer):
        built, text = _byte_level({bytes([b]): b for b in range(256)}, {}, None)
    else:
        enc = tok.encoding
        built, text = _byte_level(enc._mergeable_ranks, dict(enc._special_tokens), enc._pat_str)
    _check(tok, built, text)
    return built


def hf_tokenizer_config(tok, model_max_length: int, tokenizer_class: str = "PreTrainedTokenizerFast") -> dict:
    """``tokenizer_config.json`` for :func:`hf_tokenizer`'s file: the class, the context length, the end-of-text
    token as eos (and bos, as GPT-2's files have it), and no clean-up of spaces (decode gives the text back)."""
    eot = next((s for s, i in tok.special_tokens().items() if i == tok.eot_id), None) \
        if tok.eot_id is not None else None
    config = {"tokenizer_class": tokenizer_class, "model_max_length": int(model_max_length),
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if eot is not None:
        config.update(bos_token=eot, eos_token=eot)
    return config


def write_hf_tokenizer(tok, folder: str | Path, model_max_length: int,
                       tokenizer_class: str = "PreTrainedTokenizerFast") -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of ``tok`` into ``folder`` (a DataError, before
    anything is written, where :func:`hf_tokenizer` has none)."""
    built = hf_tokenizer(tok)
    folder = Path(folder)
    built.save(str(folder / TOKENIZER_FILE))
    config = hf_tokenizer_config(tok, model_max_length, tokenizer_class)
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
