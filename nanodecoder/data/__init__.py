"""The data pipeline: sources -> tokenizer -> prepared token files -> batches.

    spec = run_spec.data                                        # a built DataSpec
    prep = prepare_data(spec, base_dir=blueprint_folder)       # cached, hashed
    check_fits(prep, context_length, vocab_size)
    sampler = BatchSampler(prep.train, batch_size, context_length, mode=spec.sampling,
                           seed=seed, rank=rank, world_size=world_size)
    x, y = sampler.next_batch()

Nothing registers at import: :func:`register` (``kinds.py``) adds the built-in
sources and tokenizers to the catalog it is given.
"""
from __future__ import annotations

from .bpe import BpeTokenizer, TiktokenTokenizer
from .builtin import BuiltinSource
from .checks import bits_per_byte, check_fits, check_source, check_vocab, tokenizer_before_data, unigram_loss
from .errors import DataError
from .kinds import data_catalog, load_tokenizer, register, tokenizer_vocab_size
from .prepare import Prepared, cache_root, find_prepared, load_prepared, prepare_data
from .sampler import BatchSampler
from .shards import ShardedTokens, TokenShardsSource
from .sources import Corpus, DataSource, TextSource, UrlSource
from .spec import DataSpec
from .stdlib import PythonStdlibSource
from .tokenizers import ByteTokenizer, CharTokenizer, Tokenizer

__all__ = [
    "BatchSampler", "BpeTokenizer", "BuiltinSource", "ByteTokenizer", "CharTokenizer", "Corpus", "DataError", "DataSource",
    "DataSpec", "Prepared", "PythonStdlibSource", "ShardedTokens", "TextSource", "TiktokenTokenizer",
    "TokenShardsSource", "Tokenizer", "UrlSource",
    "bits_per_byte", "cache_root", "check_fits", "check_source", "check_vocab", "data_catalog", "find_prepared",
    "unigram_loss", "load_prepared", "load_tokenizer",
    "prepare_data", "register", "tokenizer_before_data", "tokenizer_vocab_size",
]
