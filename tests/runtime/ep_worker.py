"""The expert-parallel worker of ``test_expert_parallel.py`` (not a test module itself).

``worker(rank, world, ep, init_file, out)`` joins a gloo group of ``world`` processes, makes the
``(dp, ep)`` groups and, for every case of ``CASES``, builds the tiny MoE model with seed 0, swaps in
expert parallelism, runs its own micro-batch (``batch(world, rank)``) forward and backward, makes the
gradients global (non-expert: all-reduce mean; expert: ``sync_expert_grads``) and writes to ``out``:
``{case}.rank{r}.safetensors`` (loss, gradients under the single-process names with the local
expert slices, the global norm before and after clipping, balancing biases) and ``rank{r}.json``
(the full-state round trip, the raw ``forward_sorted`` checks with zero-row peers, the refusals).
"""
from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanodecoder.components.moe import MoE  # noqa: E402
from nanodecoder.components.moe_experts import Experts  # noqa: E402
from nanodecoder.components.routers import NoisyTopKRouter  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402
from nanodecoder.runtime import expert_parallel as ep_mod  # noqa: E402

VOCAB, MICRO_BATCH, T = 64, 2, 8
MOE = {"kind": "moe", "n_experts": 4, "expert_hidden": 32, "lb_loss_coef": 0.5, "z_loss_coef": 0.01}
CASES = {
    "topk": {**MOE, "top_k": 2, "router": {"kind": "topk"}},
    # per-rank capacity (1 slot per 4 routed): reference = each micro-batch separately; the sequence-wise lb loss
    # is a mean of per-sequence terms, so the mean over micro-batches is the global one
    "switch_capacity": {**MOE, "top_k": 1, "router": {"kind": "switch"}, "capacity_factor": 1.0,
                        "min_capacity": 1, "lb_loss_type": "sequence"},
    "sigmoid_groups": {**MOE, "top_k": 2, "lb_loss_coef": 0.0,
                       "router": {"kind": "sigmoid", "n_group": 2, "topk_group": 1, "bias_update_speed": 0.01}},
    "noisy_topk": {**MOE, "top_k": 2, "router": {"kind": "noisy_topk"}},
    "shared_bias_loop": {**MOE, "top_k": 2, "n_shared_experts": 1, "expert_kind": "gelu", "bias": True,
                         "dispatch": "loop"},
}
PER_MICRO_BATCH = {"switch_capacity"}       # capacity decided per rank


def model_spec(case: str):
    return build_model_spec({"context_length": T, "d_model": 32, "n_layers": 2, "dropout": 0.0,
                             "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": CASES[case]}},
                            vocab_size=VOCAB)


def batch(world: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``world`` equal micro-batches (inputs, targets), or rank ``rank``'s."""
    g = torch.Generator().manual_seed(1234 + world)
    tokens = torch.randint(0, VOCAB, (world * MICRO_BATCH, T + 1), generator=g)
    if rank is not None:
        tokens = tokens[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
    return tokens[:, :-1], tokens[:, 1:]


def deterministic_noise(self, like: torch.Tensor) -> torch.Tensor:
    """Noise of the noisy router as a smooth function of each token's own logits: independent of which
    other tokens share the batch, so one process and the ranks draw the same."""
    return torch.sin(10.0 * like.detach())


def after_step(model) -> dict[str, torch.Tensor]:
    """Apply the balancing-bias updates (all-reduce under torch.distributed) and return the biases."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.after_optimizer_step()
    return {f"bias/{n}": b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}


# ---- raw forward_sorted with peers that send nothing ------------------------------------------
ZERO_ROW_COUNTS = [[3, 2, 0, 0], [0, 0, 0, 0], [0, 1, 0, 4], [2, 0, 1, 0]]   # rank 1 sends and gets no rows


def rows_of(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.tensor(ZERO_ROW_COUNTS[rank])
    g = torch.Generator().manual_seed(rank)
    n = int(counts.sum())
    return torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g), counts


def zero_row_check(groups, dispatch: str) -> dict[str, float]:
    torch.manual_seed(0)
    full = Experts(4, 32, 32, "swiglu", bias=True, dispatch=dispatch)
    with torch.no_grad():
        for b in (full.up_bias, full.down_bias):
            b.normal_()
    local = ep_mod.ExpertParallelExperts.from_full(full, groups.ep)
    xs, w, counts = rows_of(dist.get_rank())
    xs.requires_grad_(True)
    y = local.forward_sorted(xs, counts)
    (y * w).sum().backward()
    worst = {"out": 0.0, "x_grad": 0.0, "param_grad": 0.0}
    want_grads = {n: torch.zeros_like(p) for n, p in full.named_parameters()}
    for src in dist.get_process_group_ranks(groups.ep):
        sx, sw, sc = rows_of(src)
        sx.requires_grad_(True)
        full.zero_grad()
        out = full.forward_sorted(sx, sc)
        (out * sw).sum().backward()
        for n, p in full.named_parameters():
            want_grads[n] += p.grad
        if src == dist.get_rank():
            worst["out"] = (y - out).abs().max().item() if out.numel() else 0.0
            worst["x_grad"] = (xs.grad - sx.grad).abs().max().item() if sx.numel() else 0.0
    for n, p in local.named_parameters():
        diff = (p.grad - want_grads[n][local.local_experts]).abs().max().item()
        worst["param_grad"] = max(worst["param_grad"], diff)
    return worst


def refusals(groups) -> dict[str, str]:
    out = {}
    for name, call in (("world", lambda: ep_mod.expert_parallel_groups(3)),
                       ("n_experts", lambda: ep_mod.ExpertParallelExperts.from_full(Experts(3, 32, 32, "gelu"),
                                                                                    groups.ep))):
        try:
            call()
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    return out


def worker(rank: int, world: int, ep: int, init_file: str, out: str) -> None:
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    NoisyTopKRouter.sample_noise = deterministic_noise
    try:
        groups = ep_mod.expert_parallel_groups(ep)
        report = {"ep_ranks": dist.get_process_group_ranks(groups.ep),
                  "expert_dp_ranks": dist.get_process_group_ranks(groups.expert_dp), "state": {}}
        idx, targets = batch(world, rank)
        for case in CASES:
            model = build_model(model_spec(case), seed=0)
            full_state = copy.deepcopy(model.state_dict())
            param_names = [n for n, _ in model.named_parameters()]
            ep_mod.apply_expert_parallel(model, groups.ep, groups.expert_dp)
            res = model(idx, targets)
            res.loss.backward()
            loss = res.loss.detach().clone()
            dist.all_reduce(loss)
            for p in ep_mod.replicated_params(model):
                dist.all_reduce(p.grad)
                p.grad /= world
            ep_mod.sync_expert_grads(model, world, groups.expert_dp)
            tensors = {f"grad/{n}": p.grad.clone() for n, p in model.named_parameters()}
            norm = ep_mod.grad_norm(model, groups)
            clipped = ep_mod.clip_grad_norm(model, groups, max_norm=0.5 * norm.item())
            tensors.update({"loss": loss / world, "norm": norm, "clip_returned": clipped,
                            "norm_after_clip": ep_mod.grad_norm(model, groups),
                            "dropped": torch.stack([v for k, v in res.stats.items() if k.endswith("dropped_frac")]),
                            **after_step(model)})
            save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/{case}.rank{rank}.safetensors")
            # full-state round trip: gather on rank 0; load the full state into a differently seeded model
            gathered = ep_mod.gather_full_experts_state(model)
            other = build_model(model_spec(case), seed=1)
            ep_mod.apply_expert_parallel(other, groups.ep, groups.expert_dp)
            ep_mod.load_local_experts(other, full_state)
            reloaded = ep_mod.gather_full_experts_state(other)
            local_equal = all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
            entry = {"local_equal": local_equal, "local_shapes": {
                n: list(p.shape) for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}}
            if rank == 0:
                # ``model`` had its balancing biases updated after the step: compare parameters only
                entry["gathered_keys"] = sorted(gathered) == sorted(full_state)
                entry["gathered_params_equal"] = all(torch.equal(gathered[n], full_state[n]) for n in param_names)
                entry["reloaded_equal"] = all(torch.equal(reloaded[n], full_state[n]) for n in full_state)
            else:
                entry["gathered_none"] = gathered is None and reloaded is None
            report["state"][case] = entry
        report["zero_rows"] = {d: zero_row_check(groups, d) for d in ("auto", "loop")}
        report["refusals"] = refusals(groups)
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()
