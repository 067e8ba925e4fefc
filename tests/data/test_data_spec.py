"""DataSpec: the typed, frozen form of the `data:` section."""
from __future__ import annotations

import dataclasses

import pytest

from nanodecoder.data import DataError, DataSpec, tokenizer_vocab_size


def test_from_dict_builds_frozen_typed_specs_with_defaults(regs):
    spec = DataSpec.from_dict({"source": {"kind": "python_stdlib"}, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
                              registries=regs)
    assert spec.source == regs["data_source"].get("python_stdlib").Spec(val_fraction=0.02, max_bytes=None)
    assert spec.tokenizer.vocab_size == 512
    assert spec.sampling == "random"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sampling = "sequential"
    assert DataSpec.from_dict(spec.to_dict(), registries=regs) == spec


@pytest.mark.parametrize("raw, message", [
    ({"source": {"kind": "pyhton_stdlib"}, "tokenizer": {"kind": "byte"}},
     "unknown data_source kind 'pyhton_stdlib'; did you mean 'python_stdlib'?"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "bytes"}}, "did you mean 'byte'?"),
    ({"source": {"kind": "text", "path": "a", "fraction": 0.1}, "tokenizer": {"kind": "byte"}},
     "data.source: .*unexpected keyword argument 'fraction'"),
    ({"source": {"kind": "text", "path": "a"}}, "data.tokenizer: missing"),
    ({"source": "text", "tokenizer": {"kind": "byte"}}, "data.source: expected a mapping with a 'kind' key"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "byte"}, "shuffle": True},
     "data: unknown key\\(s\\) shuffle"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "byte"}, "sampling": "shuffled"},
     "data.sampling: 'shuffled' is not one of random, sequential"),
    ({"source": {"kind": "text", "path": "a", "val_fraction": 0.0}, "tokenizer": {"kind": "byte"}},
     "data.source.val_fraction: 0.0 must be a number in \\(0, 0.5\\]"),
    ({"source": {"kind": "text"}, "tokenizer": {"kind": "byte"}}, "data.source.path: required"),
    ({"source": {"kind": "python_stdlib", "max_bytes": 0}, "tokenizer": {"kind": "byte"}},
     "data.source.max_bytes: 0 must be null or an integer >= 2"),
    ({"source": {"kind": "url", "url": "ftp://x/a.txt", "sha256": "0" * 64}, "tokenizer": {"kind": "byte"}},
     "must start with http:// or https://"),
    ({"source": {"kind": "url", "url": "http://x/a.txt"}, "tokenizer": {"kind": "byte"}},
     "data.source.sha256: required"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "bpe", "vocab_size": 256}},
     "data.tokenizer.vocab_size: 256 must be an integer from 257"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "tiktoken"}}, "data.tokenizer.name: required"),
])
def test_mistakes_are_one_line_data_errors(regs, raw, message):
    with pytest.raises(DataError, match=message) as e:
        DataSpec.from_dict(raw, registries=regs)
    assert "\n" not in str(e.value)


def test_vocab_size_known_without_the_corpus(regs, make_spec):
    src = {"kind": "text", "path": "x.txt"}
    assert tokenizer_vocab_size(make_spec(src, {"kind": "byte"}), registries=regs) == 256
    assert tokenizer_vocab_size(make_spec(src, {"kind": "bpe", "vocab_size": 1000}), registries=regs) == 1000
    assert tokenizer_vocab_size(make_spec(src, {"kind": "char"}), registries=regs) is None
    # a tokenizer spec alone works as well
    assert tokenizer_vocab_size(make_spec(src, {"kind": "byte"}).tokenizer, registries=regs) == 256
