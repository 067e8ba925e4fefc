"""Byte-level BPE files of Hugging Face (``vocab.json`` + ``merges.txt``, GPT-2's format) <-> tiktoken ranks.

GPT-2's files spell every byte as one printable character (``bytes_to_unicode``: the printable
bytes stand for themselves, the other 68 are shifted to U+0100..U+0143; ``Ġ`` is the space).
Inverting that table turns each token of ``vocab.json`` into its bytes, and its id becomes its
tiktoken rank, which is what tiktoken's own ``gpt2`` encoding holds (tiktoken builds it from
OpenAI's copies of the same two files).  ``merges.txt`` is read to check that the ranks follow the
merge order (tiktoken merges the pair whose result has the lowest rank; a Hugging Face BPE merges
the pair listed first) and that every token is made by a merge.

Nothing here needs the network or the ``tokenizers`` package; :func:`write_files` is the way back
(an exported run's ``vocab.json`` / ``merges.txt``).
"""
from __future__ import annotations

import json
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN

from .errors import DataError, read_utf8

VOCAB_FILE, MERGES_FILE, HF_TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB, GPT2_EOT = 50257, 50256
#: Ids that only GPT-2's vocabulary gives (with its size, end-of-text id and byte order above).
GPT2_PROBE = {"Hello world": [15496, 995], " the": [262]}


def _byte_chars() -> list[str]:
    """``chars[b]``: the character GPT-2's files write for byte ``b``."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != 0x20]
    chars, shifted = [""] * 256, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


BYTE_CHARS = _byte_chars()
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}
#: GPT-2's order of the 256 one-byte tokens (ids 0..255): the printable bytes first.
GPT2_BYTE_ORDER = sorted(range(256), key=lambda b: ord(BYTE_CHARS[b]))


def token_bytes(token: str) -> bytes | None:
    """The bytes a ``vocab.json`` token stands for; None if a character is outside the byte table."""
    try:
        return bytes(CHAR_BYTE[c] for c in token)
    except KeyError:
        return None


def token_text(data: bytes) -> str:
    return "".join(BYTE_CHARS[b] for b in data)


def _line_of(text: str, token: str) -> int | None:
    for spelled in (json.dumps(token), json.dumps(token, ensure_ascii=False)):
        at = text.find(spelled + ":")
        if at < 0:
            at = text.find(spelled)
        if at >= 0:
            return text.count("\n", 0, at) + 1
    return None


def _where(path: Path, text: str, token: str) -> str:
    line = _line_of(text, token)
    return f"{path} line {line}" if line else str(path)


MISSING = "missing (a byte-level BPE folder holds vocab.json and merges.txt)"


def _read_vocab(path: Path) -> tuple[dict[str, int], str]:
    text = read_utf8(path, MISSING)
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"{path}: expected a JSON object of token -> id, got {type(vocab).__name__}")
    seen: dict[int, str] = {}
    for tok, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise DataError(f"{_where(path, text, tok)}: token {tok!r} has id {i!r}; ids are integers >= 0")
        if i in seen:
            raise DataError(f"{_where(path, text, tok)}: id {i} is given to both {seen[i]!r} and {tok!r}")
        seen[i] = tok
    missing = next((i for i in range(len(vocab)) if i not in seen), None)
    if missing is not None:
        raise DataError(f"{path}: ids must be 0..{len(vocab) - 1} with none left out; id {missing} is unused "
                        f"(largest id {max(seen)})")
    return vocab, text


def _special_names(folder: Path, vocab: dict[str, int]) -> set[str]:
    """The added (special) tokens of the folder's tokenizer.json if it has one, and <|endoftext|>."""
    names = {EOT_TEXT} & set(vocab)
    f = folder / HF_TOKENIZER_FILE
    if f.is_file():
        try:
            added = json.loads(f.read_text(encoding="utf-8")).get("added_tokens") or []
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{f}: unreadable ({e})") from None
        names |= {a["content"] for a in added if isinstance(a, dict) and a.get("content") in vocab}
    return names


def read_files(folder: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """``(mergeable ranks, special tokens)`` of a byte-level BPE folder (``vocab.json`` + ``merges.txt``).

    Every problem is a DataError naming the file (and line): a missing file, a malformed merge line,
    a merge of tokens not in the vocabulary, ranks that would not follow the merge order, a byte with
    no token, or a token no merge makes (unreachable)."""
    folder = Path(folder)
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    vocab, vocab_text = _read_vocab(vocab_path)
    merge_lines = read_utf8(merges_path, MISSING).split("\n")
    specials = _special_names(folder, vocab)
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if tok in specials:
            continue
        data = token_bytes(tok)
        if data is None or not data:
            bad = next((c for c in tok if c not in CHAR_BYTE), "")
            raise DataError(f"{_where(vocab_path, vocab_text, tok)}: token {tok!r} (id {i}) has the character "
                            f"{bad!r}, which is not in GPT-2's byte table: not a byte-level BPE vocabulary")
        if data in ranks:
            raise DataError(f"{_where(vocab_path, vocab_text, tok)}: token {tok!r} (id {i}) has the same bytes as "
                            f"id {ranks[data]}")
        ranks[data] = i
    for b in range(256):
        if bytes([b]) not in ranks:
            raise DataError(f"{vocab_path}: no token for byte 0x{b:02X} ({BYTE_CHARS[b]!r}): not a complete "
                            "byte-level BPE vocabulary")
    made: dict[bytes, int] = {}
    last = -1
    for n, line in enumerate(merge_lines, start=1):
        if line.startswith("#version") and n == 1 or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{merges_path} line {n}: expected two tokens separated by one space, got {line!r}")
        pieces = []
        for part in parts:
            data = token_bytes(part)
            if data is None or data not in ranks:
                raise DataError(f"{merges_path} line {n}: {part!r} is not a token of {VOCAB_FILE}")
            pieces.append(data)
        merged = pieces[0] + pieces[1]
        if merged not in ranks:
            raise DataError(f"{merges_path} line {n}: the merge gives {token_text(merged)!r}, which is not in "
                            f"{VOCAB_FILE}")
        if merged in made:
            raise DataError(f"{merges_path} line {n}: {token_text(merged)!r} is already made by line {made[merged]}")
        if ranks[merged] <= last:
            raise DataError(f"{merges_path} line {n}: the merge gives id {ranks[merged]}, not above the id of the "
                            f"merge before it ({last}); the ids of {VOCAB_FILE} must follow the merge order")
        made[merged], last = n, ranks[merged]
    for tok, i in vocab.items():
        data = token_bytes(tok) if tok not in specials else None
        if data is not None and len(data) > 1 and data not in made:
            raise DataError(f"{_where(vocab_path, vocab_text, tok)}: token {tok!r} (id {i}) is not made by any "
                            f"merge of {MERGES_FILE} (unreachable)")
    return ranks, {tok: vocab[tok] for tok in sorted(specials, key=vocab.get)}


def encoding_from_files(folder: str | Path, name: str, pattern: str = GPT2_PATTERN) -> "tiktoken.Encoding":
    """A ``tiktoken.Encoding`` of a byte-level BPE folder, split by ``pattern`` (GPT-2's by default)."""
    ranks, specials = read_files(folder)
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:
        raise DataError(f"{folder}: tiktoken refused the vocabulary ({e})") from None


def gpt2_mismatch(encoding) -> str | None:
    """Why ``encoding`` is not GPT-2's vocabulary (None when it is)."""
    if encoding.n_vocab != GPT2_VOCAB:
        return f"it has {encoding.n_vocab} tokens, GPT-2 has {GPT2_VOCAB}"
    if encoding._special_tokens != {EOT_TEXT: GPT2_EOT}:
        return f"its special tokens are {encoding._special_tokens}, GPT-2 has {{'{EOT_TEXT}': {GPT2_EOT}}}"
    ranks = encoding._mergeable_ranks
    if any(ranks.get(bytes([b])) != i for i, b in enumerate(GPT2_BYTE_ORDER)):
        return "its one-byte tokens are not GPT-2's ids 0..255"
    for text, ids in GPT2_PROBE.items():
        got = encoding.encode_ordinary(text)
        if got != ids:
            return f"{text!r} encodes to {got}, GPT-2 gives {ids}"
    return None


def gpt2_from_files(folder: str | Path) -> "tiktoken.Encoding":
    """tiktoken's ``gpt2`` encoding built from a GPT-2 Hugging Face folder's ``vocab.json`` + ``merges.txt``."""
    enc = encoding_from_files(folder, "gpt2")
    why = gpt2_mismatch(enc)
    if why:
        raise DataError(f"{Path(folder) / VOCAB_FILE}: not GPT-2's vocabulary ({why}); the gpt2 encoding needs "
                        "the vocab.json and merges.txt of a GPT-2 model (e.g. openai-community/gpt2)")
    return enc


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of tiktoken ``ranks`` in rank order, one per token longer than a byte: the split that BPE
    with only the lower ranks gives (a token whose bytes do not come out in two pieces that way is no
    merge of lower-ranked tokens: a DataError)."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe(ranks, tok, rank)
        if len(parts) != 2:
            raise DataError(f"token {tok!r} (rank {rank}) is not one merge of lower-ranked tokens; it cannot be "
                            "written as a BPE merge")
        merges.append((parts[0], parts[1]))
    return merges


def write_files(encoding, folder: str | Path) -> None:
    """``vocab.json`` + ``merges.txt`` (GPT-2's format) of a tiktoken byte-level encoding (:func:`merges_of`)."""
    ranks = encoding._mergeable_ranks
    vocab = {token_text(tok): rank for tok, rank in ranks.items()}
    vocab.update(encoding._special_tokens)
    merges = [f"{token_text(a)} {token_text(b)}" for a, b in merges_of(ranks)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VOCAB_FILE).write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                                ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / MERGES_FILE).write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def _bpe(ranks: dict[bytes, int], data: bytes, below: int) -> list[bytes]:
    """Byte pair encoding of ``data`` using only the ranks under ``below``."""
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < below and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts
