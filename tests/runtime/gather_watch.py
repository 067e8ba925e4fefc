"""``python -m nanodecoder.run ARGS`` with every gather of a floating-point tensor recorded while a checkpoint is
written: torch.distributed's gathers and DTensor's ``full_tensor`` / ``redistribute`` (what a full state dict
uses).  Each rank writes ``{"saves": N, "gathers": [...]}`` to ``$GATHER_WATCH.<rank>`` at exit, so a test can
check that writing a sharded checkpoint never materialises a whole tensor of a sharded parameter.

Launched by the tests as ``torchrun ... gather_watch.py BLUEPRINT ...``.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanodecoder.cli.run import main
from nanodecoder.train.loop import TrainingLoop

record = {"saves": 0, "gathers": []}
saving = False


def _watch(owner, name: str, tensor_arg: int | None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def watched(*args, **kwargs):
        t = args[tensor_arg] if tensor_arg is not None and len(args) > tensor_arg else args[0]
        if saving and isinstance(t, torch.Tensor) and t.is_floating_point():
            record["gathers"].append(f"{name} {tuple(t.shape)}")
        return original(*args, **kwargs)
    setattr(owner, name, watched)


for fn, arg in (("all_gather", 1), ("all_gather_into_tensor", 1), ("gather", 0), ("broadcast", 0)):
    _watch(dist, fn, arg)
_watch(DTensor, "full_tensor", 0)
_watch(DTensor, "redistribute", 0)
_save = TrainingLoop.save


def save(self, *args, **kwargs):
    global saving
    record["saves"] += 1
    saving = True
    try:
        return _save(self, *args, **kwargs)
    finally:
        saving = False


TrainingLoop.save = save


@atexit.register
def _write() -> None:
    with open(f"{os.environ['GATHER_WATCH']}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
