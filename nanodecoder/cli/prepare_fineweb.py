"""A Hugging Face text dataset -> GPT-2 token shards in llm.c's .bin format, for ``data.source: {kind: token_shards}``.

    python tools/prepare_fineweb.py                              # FineWeb-Edu sample-10BT -> data/edu_fineweb10B/
    python tools/prepare_fineweb.py --dataset fineweb            # FineWeb sample-10BT     -> data/fineweb10B/
    python tools/prepare_fineweb.py --data-files 'dl/*.parquet' --out data/mine --max-tokens 200_000_000

The dataset is streamed (``datasets.load_dataset(..., streaming=True)``; ``--data-files`` reads local .parquet
or .json/.jsonl files through the same path) and its ``text`` field tokenized with tiktoken's ``gpt2`` encoding,
each document preceded by ``<|endoftext|>`` (50256) as llm.c's ``fineweb.py`` does.  The first ``--shard-size``
tokens are the validation shard ``<prefix>_val_000000.bin``, the following ones the train shards
``<prefix>_train_000001.bin``, ...; documents are cut across shard boundaries, so every shard but the last is
full.  Each shard is written under a temporary name and renamed once complete.

Offline, tiktoken needs its cached gpt2 file (``TIKTOKEN_CACHE_DIR``), or ``--tokenizer-files DIR`` a folder with
GPT-2's Hugging Face ``vocab.json`` and ``merges.txt`` (e.g. a download of openai-community/gpt2).
"""
from __future__ import annotations

import argparse
import collections
import glob
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
from tqdm import tqdm

from ..data import DataError
from ..data.bpe import EOT_TEXT, get_named_encoding
from ..data.hf_bpe import gpt2_from_files
from ..data.shards import ShardWriter, check_uint16
from .common import EXIT_USAGE, fail


@dataclass(frozen=True)
class Preset:
    name: str        # the Hugging Face dataset
    config: str      # its configuration (subset)
    prefix: str      # shard file names: <prefix>_val_000000.bin, <prefix>_train_000001.bin, ...
    out: str         # default output folder


PRESETS = {
    "fineweb-edu": Preset("HuggingFaceFW/fineweb-edu", "sample-10BT", "edu_fineweb", "data/edu_fineweb10B"),
    "fineweb": Preset("HuggingFaceFW/fineweb", "sample-10BT", "fineweb", "data/fineweb10B"),
}
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
INSTALL = "pip install '.[fineweb]' (or pip install datasets)"


def count(text: str) -> int:
    """A token count written as 100000000, 100_000_000 or 1e8."""
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of tokens") from None
        if not f.is_integer():
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of tokens") from None
        value = int(f)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python tools/prepare_fineweb.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dataset", choices=sorted(PRESETS), default="fineweb-edu",
                    help="which sample-10BT to stream: FineWeb-Edu (default) or FineWeb")
    ap.add_argument("--name", help="another Hugging Face dataset (overrides --dataset's)")
    ap.add_argument("--config", help="its configuration/subset (overrides --dataset's; 'none' for none)")
    ap.add_argument("--split", default="train", help="the dataset split to read (default: train)")
    ap.add_argument("--data-files", metavar="PATH",
                    help="read a local .parquet or .json/.jsonl file (or a glob of them) instead of the Hub")
    ap.add_argument("--text-field", default="text", help="the record field holding the document (default: text)")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: data/edu_fineweb10B or data/fineweb10B; "
                                                  "required with --name or --data-files)")
    ap.add_argument("--prefix", help="shard name prefix (default: edu_fineweb, fineweb, or from --name; 'tokens' "
                                     "for --data-files)")
    ap.add_argument("--shard-size", type=count, default=100_000_000, metavar="N",
                    help="tokens per shard (default 100_000_000, as llm.c)")
    ap.add_argument("--max-tokens", type=count, metavar="N", help="stop after N tokens in all")
    ap.add_argument("--tokenizer-files", metavar="DIR",
                    help="build the gpt2 encoding from GPT-2's vocab.json + merges.txt in DIR (offline)")
    ap.add_argument("--workers", type=count, default=1, metavar="N",
                    help="tokenizing processes (default 1: one process, tiktoken's threads)")
    ap.add_argument("--docs-per-batch", type=count, default=1024, metavar="N",
                    help="documents handed to the tokenizer at once (default 1024)")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete shards of the same prefix already in --out first (else they are refused)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="tqdm progress bar in tokens on stderr (default: on)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- the tokenizer
def gpt2_encoding(files: str | None):
    """tiktoken's gpt2 encoding: from ``files`` (vocab.json + merges.txt) or tiktoken's cache."""
    try:
        enc = gpt2_from_files(files) if files else get_named_encoding("gpt2")
    except DataError as e:
        msg = str(e).replace("set data.tokenizer.files to", "give --tokenizer-files")
        raise DataError(f"--tokenizer-files: {msg}" if files else msg) from None
    if EOT_TEXT not in enc._special_tokens:
        raise DataError(f"the gpt2 encoding has no {EOT_TEXT} token")
    if enc.n_vocab > 2 ** 16:
        raise DataError(f"the encoding has {enc.n_vocab} tokens; uint16 shards hold at most 65536")
    return enc


def join_documents(encoded: list[list[int]], eot: int) -> np.ndarray:
    """``eot, doc0..., eot, doc1..., ...`` as one uint16 array (llm.c puts the end-of-text token before each
    document); an id that does not fit uint16 is an error."""
    flat: list[int] = []
    for ids in encoded:
        flat.append(eot)
        flat.extend(ids)
    out = np.array(flat, dtype=np.int64)
    check_uint16(out, "")
    return out.astype(np.uint16)


_WORKER: dict = {}


def _start_worker(name: str, pattern: str, ranks: dict, specials: dict) -> None:
    _WORKER["enc"] = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    _WORKER["eot"] = specials[EOT_TEXT]


def _encode_in_worker(docs: list[str]) -> np.ndarray:
    return join_documents(_WORKER["enc"].encode_ordinary_batch(docs, num_threads=1), _WORKER["eot"])


def token_batches(enc, batches: Iterable[list[str]], workers: int) -> Iterator[np.ndarray]:
    """The joined tokens of each batch of documents, in order (``workers`` > 1: that many processes)."""
    eot = enc._special_tokens[EOT_TEXT]
    if workers <= 1:
        threads = os.cpu_count() or 1
        for docs in batches:
            yield join_documents(enc.encode_ordinary_batch(docs, num_threads=threads), eot)
        return
    init = (enc.name, enc._pat_str, enc._mergeable_ranks, enc._special_tokens)
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=init) as pool:
        pending: collections.deque = collections.deque()    # at most 2 batches per worker in flight
        for docs in batches:
            pending.append(pool.apply_async(_encode_in_worker, (docs,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- the documents
def local_files(pattern: str) -> tuple[str, list[str]]:
    """The datasets builder ("parquet" or "json") and the files of ``--data-files`` (a path or a glob)."""
    path = os.path.expanduser(pattern)
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"--data-files: the glob '{pattern}' matched no files")
    elif os.path.isdir(path):
        raise DataError(f"--data-files: {path} is a folder; give a file or a glob such as {path}/*.parquet")
    elif not os.path.isfile(path):
        raise DataError(f"--data-files: {path}: no such file")
    else:
        files = [path]
    kinds = set()
    for f in files:
        name = f.lower()
        for ext in COMPRESSED:
            name = name.removesuffix(ext)
        kind = LOCAL_FORMATS.get(Path(name).suffix)
        if kind is None:
            raise DataError(f"--data-files: {f}: not a .parquet, .json or .jsonl file")
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"--data-files: '{pattern}' mixes parquet and JSON files; give one kind at a time")
    return kinds.pop(), files


def open_dataset(args):
    """The streamed dataset and a description of it for messages."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"the datasets package is needed to read the data: {INSTALL}") from None
    if args.data_files:
        builder, files = local_files(args.data_files)
        where = files[0] if len(files) == 1 else f"{args.data_files} ({len(files)} files)"
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True), where
        except Exception as e:   # datasets raises many kinds; the message is what the user needs
            raise DataError(f"--data-files: cannot read {where} ({type(e).__name__}: {_first_line(e)})") from None
    preset = PRESETS[args.dataset]
    name = args.name or preset.name
    config = args.config if args.config is not None else (None if args.name else preset.config)
    config = None if config in ("", "none", "None") else config
    where = name + (f" ({config})" if config else "")
    try:
        return datasets.load_dataset(name, name=config, split=args.split, streaming=True), where
    except Exception as e:
        raise DataError(f"cannot open {where} split '{args.split}' ({type(e).__name__}: {_first_line(e)}); "
                        "without internet access give --data-files with local copies") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def documents(ds, text_field: str, where: str) -> Iterator[str]:
    """The text of each record; a record without the field, or whose field is not text, is a DataError."""
    it = iter(ds)
    i = 0
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{where}: reading record {i} failed ({type(e).__name__}: {_first_line(e)})") from None
        if text_field not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where}: record {i} has no field '{text_field}' (its fields: {fields}); "
                            "choose one with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: record {i}: field '{text_field}' is {type(text).__name__}, not text")
        yield text
        i += 1


def batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- the run
def output(args) -> tuple[Path, str]:
    """The output folder and shard prefix (checked, nothing written yet)."""
    if args.out is None and (args.name or args.data_files):
        raise DataError("--out DIR is needed with --name or --data-files")
    out = Path(os.path.expanduser(args.out or PRESETS[args.dataset].out))
    prefix = args.prefix or ("tokens" if args.data_files else
                             args.name.rsplit("/", 1)[-1].lower().replace("-", "_") if args.name else
                             PRESETS[args.dataset].prefix)
    if not prefix or any(c in prefix for c in "/\\*?["):
        raise DataError(f"--prefix '{prefix}': give a plain file-name prefix")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: not a folder")
    return out, prefix


def clear_output(out: Path, prefix: str, overwrite: bool) -> None:
    """Create ``out``; shards of ``prefix`` already there are refused, or deleted with ``overwrite``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    old = sorted(p for split in ("train", "val") for p in out.glob(f"{prefix}_{split}_*.bin"))
    if old and not overwrite:
        raise DataError(f"--out {out} already holds {len(old)} '{prefix}' shard(s) (e.g. {old[0].name}); "
                        "pass --overwrite to replace them, or choose another --out")
    for p in old:
        p.unlink()


def run(args) -> ShardWriter:
    out, prefix = output(args)
    enc = gpt2_encoding(args.tokenizer_files)
    ds, where = open_dataset(args)
    clear_output(out, prefix, args.overwrite)
    writer = ShardWriter(out, prefix, args.shard_size)
    limit = args.max_tokens
    batches = batched(documents(ds, args.text_field, where), args.docs_per_batch)
    with tqdm(total=limit, unit="tok", unit_scale=True, desc="tokenize", file=sys.stderr,
              disable=not args.progress) as bar:
        stream = token_batches(enc, batches, args.workers)
        try:
            for tokens in stream:
                if limit is not None:
                    tokens = tokens[:limit - writer.n_tokens - writer.filled]
                writer.add(tokens)
                bar.update(len(tokens))
                if limit is not None and writer.n_tokens + writer.filled >= limit:
                    break
        finally:
            stream.close()        # a pool of workers stops here, also on an error
    writer.close()
    return writer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        writer = run(args)
    except DataError as e:
        return fail(e, EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are complete; no partial shard was left", file=sys.stderr)
        return 130
    shards = writer.written
    if not shards:
        return fail(DataError("the dataset gave no tokens; nothing was written"), EXIT_USAGE)
    val, train = shards[0], shards[1:]
    print(f"wrote {writer.n_tokens:,} tokens to {val.parent}: validation {val.name} "
          f"({min(writer.n_tokens, args.shard_size):,} tokens), {len(train)} train shard(s)"
          + (f" {train[0].name} .. {train[-1].name}" if train else ""))
    if not train:
        print(f"note: everything fit the validation shard (--shard-size {args.shard_size:,}); training needs train "
              "shards too: lower --shard-size or raise --max-tokens", file=sys.stderr)
    return 0
