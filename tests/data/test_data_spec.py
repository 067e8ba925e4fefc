"""DataSpec: the typed, frozen form of the `data:` section."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from nanodecoder.cli.blueprint import load_blueprint
from nanodecoder.config import BlueprintError, build
from nanodecoder.config.declare import to_yaml
from nanodecoder.data import DataSpec, tokenizer_vocab_size


MODEL = {"vocab_size": 256, "context_length": 16, "d_model": 16, "n_layers": 1,
         "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu"}}}


def test_build_makes_frozen_typed_specs_with_defaults(regs):
    spec = build(DataSpec, {"source": {"kind": "python_stdlib"}, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
                 regs)
    stdlib = regs["data_source"].get("python_stdlib")
    assert spec.source == stdlib.Spec(kind="python_stdlib", val_fraction=0.02, max_bytes=None)
    assert spec.source.impl is stdlib and spec.tokenizer.impl is regs["tokenizer"].get("bpe")
    assert spec.tokenizer.vocab_size == 512
    assert spec.sampling == "random"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sampling = "sequential"
    assert build(DataSpec, to_yaml(spec), regs) == spec


@pytest.mark.parametrize("raw, where, message", [
    ({"source": {"kind": "pyhton_stdlib"}, "tokenizer": {"kind": "byte"}},
     "data.source.kind", "unknown data_source kind 'pyhton_stdlib'; did you mean 'python_stdlib'?"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "bytes"}},
     "data.tokenizer.kind", "unknown tokenizer kind 'bytes'; did you mean 'byte'?"),
    ({"source": {"kind": "text", "path": "a", "fraction": 0.1}, "tokenizer": {"kind": "byte"}},
     "data.source.fraction", "unknown key 'fraction' for data_source kind 'text'; did you mean 'val_fraction'?"),
    ({"source": {"kind": "text", "path": "a"}}, "data", "missing required key 'tokenizer'"),
    ({"source": "text", "tokenizer": {"kind": "byte"}},
     "data.source", "expected a mapping .*got the string 'text'; write {kind: text}"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "byte"}, "shuffle": True},
     "data.shuffle", "unknown key 'shuffle' \\(allowed here: sampling, source, tokenizer\\)"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "byte"}, "sampling": "shuffled"},
     "data.sampling", "unknown value 'shuffled' \\(expected one of: random, sequential\\)"),
    ({"source": {"kind": "text", "path": "a", "val_fraction": 0.0}, "tokenizer": {"kind": "byte"}},
     "data.source.val_fraction", "0.0 is out of range; expected a value > 0"),
    ({"source": {"kind": "text", "path": "a", "val_fraction": 0.6}, "tokenizer": {"kind": "byte"}},
     "data.source.val_fraction", "0.6 is out of range; expected a value <= 0.5"),
    ({"source": {"kind": "text"}, "tokenizer": {"kind": "byte"}},
     "data.source", "missing required key 'path' for data_source kind 'text'"),
    ({"source": {"kind": "text", "path": ""}, "tokenizer": {"kind": "byte"}}, "data.source.path", "must not be empty"),
    ({"source": {"kind": "python_stdlib", "max_bytes": 0}, "tokenizer": {"kind": "byte"}},
     "data.source.max_bytes", "0 is out of range; expected a value >= 2"),
    ({"source": {"kind": "url", "url": "ftp://x/a.txt", "sha256": "0" * 64}, "tokenizer": {"kind": "byte"}},
     "data.source.url", "'ftp://x/a.txt' does not match the pattern \\^https\\?://; expected the http:// or https://"),
    ({"source": {"kind": "url", "url": "http://x/a.txt"}, "tokenizer": {"kind": "byte"}},
     "data.source", "missing required key 'sha256' for data_source kind 'url'"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "bpe", "vocab_size": 256}},
     "data.tokenizer.vocab_size", "256 is out of range; expected a value >= 257"),
    ({"source": {"kind": "text", "path": "a"}, "tokenizer": {"kind": "tiktoken"}},
     "data.tokenizer", "missing required key 'name' for tokenizer kind 'tiktoken'"),
])
def test_mistakes_are_one_located_line_each(tmp_path, raw, where, message):
    """Bounds and kinds are checked when the blueprint is validated: one problem, on one line, at its key."""
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "data": raw}, sort_keys=False))
    with pytest.raises(BlueprintError) as e:
        load_blueprint(path)
    assert len(e.value.problems) == 1, str(e.value)
    problem = e.value.problems[0]
    assert "\n" not in str(problem)
    assert problem.path == where and problem.line is not None
    assert re.search(message, problem.message), problem.message


def test_vocab_size_known_without_the_corpus(regs, make_spec):
    src = {"kind": "text", "path": "x.txt"}
    assert tokenizer_vocab_size(make_spec(src, {"kind": "byte"})) == 256
    assert tokenizer_vocab_size(make_spec(src, {"kind": "bpe", "vocab_size": 1000})) == 1000
    assert tokenizer_vocab_size(make_spec(src, {"kind": "char"})) is None
    # a tokenizer spec alone works as well
    assert tokenizer_vocab_size(make_spec(src, {"kind": "byte"}).tokenizer) == 256
