"""Cluster plans (``param_count --cluster``): layouts, their per-GPU memory and traffic, the smallest cluster."""
from __future__ import annotations

import json

import pytest

from nanodecoder.cli import param_count
from nanodecoder.model import plan as P
from nanodecoder.model.cluster import (Cluster, ClusterError, Layout, base_plan, cluster_plans, frontier, layouts,
                                       parse_cluster, plan_layout, smallest_cluster)
from nanodecoder.model.spec import build_model_spec

MOE = {"vocab_size": 512, "context_length": 256, "d_model": 64, "n_layers": 4, "tie_embeddings": False,
       "positional": {"kind": "rope"},
       "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 4},
                 "mlp": {"kind": "moe", "n_experts": 8, "top_k": 2, "expert_hidden": 128}},
       "overrides": [{"layers": [0], "mlp": {"kind": "swiglu", "hidden_size": 128}}]}


def moe_plan(**setting):
    spec = build_model_spec(MOE)
    return base_plan(spec, P.Setting(context=256, batch=2, precision="bf16", **setting))


def test_a_cluster_is_read_with_units_and_gpu_names():
    c = parse_cluster("nodes=4, gpus_per_node=8, gpu_memory=80GiB")
    assert (c.world, c.gpu_memory, c.gpu_flops, c.mfu) == (32, 80 * 2 ** 30, 989e12, 0.4)
    c = parse_cluster("nodes=2,gpu=a100,mfu=0.5,gpu_memory=40GB")
    assert (c.gpu_flops, c.gpu_memory, c.mfu) == (312e12, 40e9, 0.5)


@pytest.mark.parametrize("text, message", [
    ("gpus_per_node=8", "needs nodes=N"),
    ("nodes=2,gpu=tpu", "gpu=tpu: known GPUs are h100"),
    ("nodes=2,gpu_memory=80 parsecs", "gpu_memory=80 parsecs: expected a size such as 80GiB"),
    ("nodes=two", "nodes=two: expected a number"),
    ("nodes=2,speed=fast", "'speed=fast': expected KEY=VALUE with KEY among nodes"),
    ("nodes=2,mfu=40", "mfu=40.0: a fraction of the peak"),
    ("nodes=0", "nodes=0: must be positive"),
])
def test_a_bad_cluster_is_one_line_naming_the_key(text, message):
    with pytest.raises(ClusterError, match=message.replace("(", r"\(")):
        parse_cluster(text)


def test_layouts_split_experts_only_where_every_moe_layer_divides():
    spec = build_model_spec(MOE)
    got = {(lay.fsdp, lay.ep) for lay in layouts(spec, 16)}
    assert got == {(f, e) for f in (1, 2, 4, 8, 16) for e in (1, 2, 4, 8) if e <= f and f % e == 0}
    dense = build_model_spec({**MOE, "block": {**MOE["block"], "mlp": {"kind": "swiglu"}}, "overrides": []})
    assert {lay.ep for lay in layouts(dense, 16)} == {1}


def test_one_layout_by_hand():
    base = moe_plan()
    spec = base.spec
    cluster = Cluster(nodes=2, gpus_per_node=4, gpu_memory=2 ** 40, gpu_flops=1e15, mfu=0.5)
    lp = plan_layout(base, cluster, Layout(fsdp=4, ep=2, checkpointing=False))
    total = base.params.total
    assert lp.replicas == 2
    assert lp.memory.weights == lp.memory.gradients == 4 * total / 4
    assert lp.memory.optimizer == 8 * total / 4
    moe = spec.blocks[1].mlp
    experts = moe.n_params - moe.router.n_params
    layer = spec.blocks[1].attention.n_params + moe.n_params
    dense_layer = spec.blocks[0].attention.n_params + spec.blocks[0].mlp.n_params
    blocks = dense_layer + 3 * (layer - experts / 2)
    norms = len(spec.blocks) * 2 * spec.blocks[0].norm.n_params    # pre-norm: two per block
    blocks += norms                          # each block's two norms are gathered with it, not with the root
    root = total - dense_layer - 3 * layer - norms
    assert lp.all_gather == pytest.approx(4 * 3 / 4 * (2 * blocks + root))
    assert lp.reduce_scatter == pytest.approx(4 * 3 / 4 * (blocks + root))
    assert lp.all_reduce == pytest.approx(2 * 4 * total / 4 * 1 / 2)
    # 3 MoE layers x top 2 rows x 64 numbers x 2 bytes per token, half leaving the rank, dispatch + combine, fwd + bwd
    assert lp.all_to_all == pytest.approx(2 * 2 * 512 * 3 * 2 * 64 * 2 * 1 / 2)
    assert lp.step_time == pytest.approx(base.flops.training * 512 / 5e14)
    assert lp.tokens_per_s == pytest.approx(8 * 512 / lp.step_time)
    ckpt = plan_layout(base, cluster, Layout(fsdp=4, ep=2, checkpointing=True))
    assert ckpt.all_to_all == pytest.approx(lp.all_to_all * 3 / 2)            # the recomputed forward's too
    assert ckpt.memory.activations < lp.memory.activations
    # splitting the experts shrinks what FSDP gathers, never the sharded state
    no_ep = plan_layout(base, cluster, Layout(fsdp=4, ep=1, checkpointing=False))
    assert no_ep.memory.gathered > lp.memory.gathered and no_ep.memory.weights == lp.memory.weights
    assert no_ep.all_to_all == 0


def test_the_smallest_cluster_fits_and_half_of_it_does_not():
    base = moe_plan()
    eight = Cluster(nodes=4, gpus_per_node=2, gpu_memory=2 ** 40)       # the leanest layout on 8 GPUs just fits
    leanest = min(lp.memory.total for lp in cluster_plans(base, eight))
    cluster = Cluster(nodes=1, gpus_per_node=2, gpu_memory=leanest)
    c, lp = smallest_cluster(base, cluster)
    assert lp.fits and lp.memory.total <= cluster.gpu_memory and c.nodes == 4
    half = Cluster(nodes=c.nodes // 2, gpus_per_node=2, gpu_memory=cluster.gpu_memory)
    assert not any(p.fits for p in cluster_plans(base, half))
    assert all(p.fits for p in frontier(cluster_plans(base, c)))


def test_the_command_prints_the_layouts_and_json(capsys):
    assert param_count.main(["zoo/mixtral_8x7b", "--context", "4096", "--precision", "bf16",
                             "--cluster", "nodes=2,gpus_per_node=8,gpu=h100"]) == 0
    out = capsys.readouterr().out
    assert "mixtral_8x7b on 2 nodes x 8 H100 = 16 GPUs" in out and "FSDP 16 x EP 8" in out
    assert "smallest cluster that fits: 2 nodes (16 GPUs)" in out
    assert param_count.main(["zoo/mixtral_8x7b", "--context", "4096", "--json",
                             "--cluster", "nodes=2,gpus_per_node=8"]) == 0
    plan = json.loads(capsys.readouterr().out)["zoo/mixtral_8x7b"]["cluster_plan"]
    assert plan["smallest"]["nodes"] == 2 and plan["shown"] and len(plan["layouts"]) > len(plan["shown"])


def test_a_bad_cluster_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        param_count.main(["zoo/mixtral_8x7b", "--cluster", "gpus=8"])
    assert e.value.code == 2
    assert "--cluster 'gpus=8': expected KEY=VALUE" in capsys.readouterr().err
