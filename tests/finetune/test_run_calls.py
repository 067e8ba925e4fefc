"""Following a run through its calls, how often does the code go back up the layering?

The import graph (``tests/test_layering.py``) points down only, but a call can still go up: a lower layer
handed an object of a higher one (a callback, a strategy) calls into it.  This runs a pre-training run and
an SFT run in-process under ``sys.setprofile`` and collects every distinct caller -> callee pair, both
functions of the package, whose callee sits in a higher layer.  Left out: the config core's dispatch to the
classes it builds and checks (``config/declare.py``, ``config/registry.py`` calling a declared class's
constructor, ``check`` or registration), which is how every owner of a parameter is reached.
Each run may go up at most 3 times (the issue's target); today both go up twice, ``model/generate.py``
calling the tokenizer object it is handed (``encode``, ``decode``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from test_finetune_sft import sft_blueprint
from evalhelpers import lm_raw, write_yaml
from nanodecoder.cli.run import main as run_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_layering import MODULES, layer  # noqa: E402

PACKAGE = str(Path(next(iter(MODULES.values()))).resolve().parents[0])
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DISPATCH = ("nanodecoder.config.declare", "nanodecoder.config.registry")


def _module(filename: str) -> str | None:
    path = Path(filename)
    try:
        parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    except ValueError:
        return None
    if parts[0] != "nanodecoder":
        return None
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return name if name in MODULES else None


def upcalls(argv: list[str]) -> set[tuple[str, str]]:
    seen: dict[str, str | None] = {}
    found: set[tuple[str, str]] = set()

    def module(code) -> str | None:
        if code.co_filename not in seen:
            seen[code.co_filename] = _module(code.co_filename)
        return seen[code.co_filename]

    def profile(frame, event, arg):
        if event != "call" or (callee := module(frame.f_code)) is None:
            return
        caller, back = None, frame.f_back
        while back is not None and (caller := module(back.f_code)) is None:   # through torch's and stdlib frames
            back = back.f_back
        if caller is None or caller in CONFIG_DISPATCH:
            return
        if layer(callee) > layer(caller):
            found.add((f"{caller}.{back.f_code.co_name}", f"{callee}.{frame.f_code.co_name}"))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        code = run_main(argv)
    finally:
        sys.setprofile(previous)
    assert code == 0
    return found


def test_pretraining_and_sft_go_back_up_a_layer_at_most_three_times(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    raw = lm_raw(tmp_path, name="pre")
    raw["train"].update(steps=3, eval_every=2, checkpoint_every=2, log_every=1)
    raw["sample"] = {"enabled": True, "prompt": "the ", "max_new_tokens": 3}
    pre = upcalls([str(write_yaml(tmp_path / "pre.yaml", raw))])
    _, bp = sft_blueprint(tmp_path, steps=3, train={"eval_every": 2, "checkpoint_every": 2},
                          sample={"enabled": True, "prompt": "Q: Add [2 3]\nA: ", "max_new_tokens": 3})
    sft = upcalls([str(bp)])
    for name, found in (("pre-training", pre), ("SFT", sft)):
        assert len(found) <= 3, f"{name} goes up a layer {len(found)} times: {sorted(found)}"
    # the two that remain: the sampler calling the tokenizer object it is handed
    assert {callee for _, callee in sft} <= {"nanodecoder.data.bpe.encode", "nanodecoder.data.bpe.decode",
                                             "nanodecoder.data.tokenizers.encode",
                                             "nanodecoder.data.tokenizers.decode"}, sorted(sft)
