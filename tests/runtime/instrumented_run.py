"""``python -m nanodecoder.run ARGS`` with test instruments, each switched on by an environment variable:

* ``GATHER_WATCH=PATH``: every gather of a floating-point tensor recorded while a checkpoint is written
  (torch.distributed's gathers and DTensor's ``full_tensor`` / ``redistribute``, what a full state dict uses);
  each rank writes ``{"saves": N, "gathers": [...]}`` to ``PATH.<rank>`` at exit, so a test can check that
  writing a sharded checkpoint never materialises a whole tensor of a sharded parameter.
* ``STALL_SHARDED_WRITE=N`` and ``STALL_MARK=PATH``: the N-th sharded write, once this rank's shards are on
  disk, writes this process's id to ``PATH.<rank>`` and waits there (for the test's ``kill -9``), before the
  checkpoint is sealed.
* ``NEWTON_SCHULZ_FP64=1``: Muon's Newton-Schulz iterations in float64 instead of bfloat16, so that two
  layouts whose gradients differ in the last float32 bit (another reduction order) do not differ by flipped
  bfloat16 roundings of the orthogonalised update (each one moves a weight by about lr x 2^-9).

Launched by the tests as ``torchrun ... instrumented_run.py BLUEPRINT ...``.
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
if "STALL_SHARDED_WRITE" in os.environ:
    import time
    from pathlib import Path

    from nanodecoder.runtime import sharded
    _write_shards, _writes = sharded.write, [0]

    def stalling_write(tensors, folder):
        _write_shards(tensors, folder)
        _writes[0] += 1
        if _writes[0] == int(os.environ["STALL_SHARDED_WRITE"]):
            Path(f"{os.environ['STALL_MARK']}.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
            time.sleep(600)
    sharded.write = stalling_write


if os.environ.get("NEWTON_SCHULZ_FP64") == "1":
    from nanodecoder.train import newton_schulz
    newton_schulz.newton_schulz_batched = functools.partial(newton_schulz.newton_schulz_batched,
                                                            dtype=torch.float64)


@atexit.register
def _write() -> None:
    if "GATHER_WATCH" not in os.environ:
        return
    with open(f"{os.environ['GATHER_WATCH']}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
