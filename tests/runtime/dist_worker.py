"""A torchrun worker for the distributed tests (not a test module itself).

    python -m torch.distributed.run --nproc_per_node=2 tests/runtime/dist_worker.py train BLUEPRINT OUT.json
    python -m torch.distributed.run --nproc_per_node=2 tests/runtime/dist_worker.py fail BLUEPRINT OUT.json

``train``: builds the blueprint's Trainer the way ``nanodecoder.cli.run`` does (profile
from the blueprint, ``Runtime.apply``), trains ``train.steps`` steps, then gathers
every buffer and parameter from every rank and checks they are identical; rank 0
writes ``{"losses": [...], "buffers_identical": ..., "params_identical": ...,
"expert_bias": [...]}``.  ``fail``: rank 1 raises while rank 0 waits in a collective.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def gathered_equal(tensors: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Per name: whether every rank holds exactly the same values."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().float().contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out[name] = all(torch.equal(parts[0], p) for p in parts[1:])
    return out


def main(mode: str, blueprint: str, out: str) -> int:
    from nanodecoder.cli.blueprint import run_spec
    from nanodecoder.cli.run import load, prepare
    from nanodecoder.model import build_model
    from nanodecoder.runtime import setup_runtime
    from nanodecoder.train.trainer import Trainer, seed_everything
    import argparse
    bp, _, base_dir, _ = load(argparse.Namespace(blueprint=blueprint, overrides=[], resume=None))
    runtime = setup_runtime(run_spec(bp).runtime)
    if mode == "fail":
        if runtime.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        runtime.mean_over_ranks(torch.ones(()))      # rank 0 waits here for a peer that is gone
        return 0
    prep, spec = prepare(bp, base_dir)
    seed_everything(spec.train.seed)
    model = runtime.apply(build_model(spec.model, device=runtime.build_device, seed=spec.train.seed))
    trainer = Trainer(model, spec.train, runtime, prep, context_length=spec.model.context_length,
                      sampling=spec.data.sampling)
    losses = [trainer.step().loss.item() for _ in range(spec.train.steps)]
    raw = trainer.raw_model
    buffers = gathered_equal(dict(raw.named_buffers()))
    params = gathered_equal(dict(raw.named_parameters()))
    if runtime.is_main:
        bias = [b.tolist() for n, b in raw.named_buffers() if n.endswith("expert_bias")]
        Path(out).write_text(json.dumps({"losses": losses, "buffers_identical": buffers,
                                         "params_identical": params, "expert_bias": bias,
                                         "describe": runtime.describe()}))
    del trainer, model, raw            # the DDP / FSDP wrapper holds the process group: release it first
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
