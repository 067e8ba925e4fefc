"""The throughput model (``model/throughput_model.py``): its arithmetic against a hand computation, how an MoE's
predicted time moves with top_k and n_experts, a real (tiny) calibration, and ``param_count.py --throughput``.
No timing is asserted: the machine constants are injected, or only checked to be positive and finite."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from nanodecoder.cli.param_count import main as param_count
from nanodecoder.model import build_model_spec
from nanodecoder.model.plan import param_report
from nanodecoder.model.throughput_model import MOE_SMALL_OPS, Machine, calibrate, predict, workload

#: a fake machine: every matmul shape at 1 GFLOP/s, and distinct rates for each kind of memory traffic
FAKE = Machine(matmul_flops={}, default_flops=1e9, stream_bandwidth=2e9, large_stream_bandwidth=1e9,
               gather_bandwidth=4e9, op_seconds=1e-5)


def tiny(mlp: dict, layers: int = 1):
    return build_model_spec({"vocab_size": 64, "context_length": 8, "d_model": 16, "n_layers": layers,
                             "positional": {"kind": "rope"},
                             "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 2},
                                       "mlp": mlp}})


def test_dense_step_against_a_hand_computation():
    spec = tiny({"kind": "gelu", "hidden_size": 32})
    w = workload(spec, batch=2)
    N, D, H, V, T = 16, 16, 32, 64, 8                                 # 2 sequences of 8 tokens
    flops = 6 * N * (D * 3 * D + D * D + 2 * D * H + D * V)           # qkv, out, up + down, head
    flops += 3 * N * 2 * 2 * (8 + 8) * (T + 1) / 2                    # 2 heads of 8, causal: 4.5 keys per token
    assert w.flops == pytest.approx(flops)
    rows = (N * 4 * (12 * 2 * D + 6 * 3 * D)                          # RoPE on q, k; head layout of q, k, v
            + N * D * (4 * 6 * 2 + 4 * 5 * 2)                         # 2 residual adds, 2 fp32 rmsnorms
            + N * 4 * 5 * H                                           # gelu
            + N * (4 * D * 4 + 4 * 5 * D))                            # embedding, final norm
    large = N * V * (7 * 4 + 2 * 4) + 40 * param_report(spec).total   # cross-entropy; AdamW + clip
    step = predict(w, FAKE)
    assert step.seconds == pytest.approx(flops / 1e9 + rows / 2e9 + large / 1e9)
    assert step.tokens_per_s == pytest.approx(N / step.seconds)
    assert workload(spec, batch=2, grad_accum=3).tokens_per_step == 3 * N


def moe(top_k: int, n_experts: int = 4):
    return tiny({"kind": "moe", "n_experts": n_experts, "top_k": top_k, "expert_kind": "gelu", "expert_hidden": 16})


def test_moe_time_grows_with_top_k_as_its_rows_say():
    (w1, s1), (w2, s2) = ((w, predict(w, FAKE)) for w in (workload(moe(k), batch=2) for k in (1, 2)))
    N, D = 16, 16
    rows = N                                          # one more row per token for each extra choice
    assert s2.parts["moe dispatch and combine"] - s1.parts["moe dispatch and combine"] == pytest.approx(
        8 * rows * D * 4 / 4e9 + (2 * N * D + 6 * rows * D) * 4 / 2e9)
    expert_flops = 6 * rows * 2 * D * 16              # up and down of a 16-wide gelu expert, per extra row
    assert s2.parts["moe experts"] - s1.parts["moe experts"] == pytest.approx(expert_flops / 1e9)
    assert s2.seconds > s1.seconds
    assert s1.parts["moe router"] >= MOE_SMALL_OPS * 1e-5


def test_moe_time_grows_with_experts_by_their_weights_and_router_only():
    s4, s8 = (predict(workload(moe(2, e), batch=2), FAKE) for e in (4, 8))
    N, D = 16, 16
    added = param_report(moe(2, 8)).total - param_report(moe(2, 4)).total
    assert added == 4 * 2 * D * 16 + 4 * D            # four more experts and their router rows
    assert s8.parts["optimizer"] - s4.parts["optimizer"] == pytest.approx(40 * added / 1e9)
    assert s8.parts["moe router"] - s4.parts["moe router"] == pytest.approx(6 * N * D * 4 / 1e9 + N * 4 * 4 * 30 / 2e9)
    assert s8.parts["moe experts"] == pytest.approx(s4.parts["moe experts"])    # the same active FLOPs
    assert s8.seconds > s4.seconds


def test_a_shape_that_was_not_calibrated_is_named():
    w = workload(moe(2), batch=2)
    measured = {s.key: 1e9 for s in w.shapes if s.kind != "experts"}
    machine = Machine(matmul_flops=measured, stream_bandwidth=1, large_stream_bandwidth=1, gather_bandwidth=1,
                      op_seconds=0)
    with pytest.raises(KeyError, match="experts 4x8x16x16 gelu"):
        predict(w, machine)


def test_calibration_measures_every_shape_of_the_workloads():
    works = [workload(tiny({"kind": "gelu"}), batch=2), workload(moe(2), batch=2),
             workload(tiny({"kind": "moe", "n_experts": 4, "top_k": 2, "expert_kind": "swiglu", "expert_hidden": 16,
                            "n_shared_experts": 1}), batch=2)]
    machine = calibrate(works, rounds=2)
    assert set(machine.matmul_flops) == {s.key for w in works for s in w.shapes}
    for value in (*machine.matmul_flops.values(), machine.stream_bandwidth, machine.large_stream_bandwidth,
                  machine.gather_bandwidth, machine.op_seconds):
        assert value > 0 and math.isfinite(value)
    assert all(math.isfinite(predict(w, machine).tokens_per_s) for w in works)


def blueprint(path, mlp: dict) -> str:
    path.write_text(yaml.safe_dump({"model": {"vocab_size": 64, "context_length": 8, "d_model": 16, "n_layers": 1,
                                              "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": mlp}},
                                    "train": {"batch_size": 2}}))
    return str(path)


def test_param_count_throughput_against_a_dense_twin(tmp_path, capsys):
    dense = blueprint(tmp_path / "dense.yaml", {"kind": "gelu", "hidden_size": 32})
    sparse = blueprint(tmp_path / "sparse.yaml", {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_kind": "gelu",
                                                  "expert_hidden": 16})
    assert param_count([sparse, "--throughput", "--against", dense]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ratios to dense" in out[0]
    assert out[1].split()[0] == "dense" and "1.000x" in out[1] and "tokens/s" in out[1]
    assert out[2].split()[0] == "sparse" and "moe experts" in out[2]
    assert param_count([sparse, "--throughput", "--against", dense, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["reference"] == dense and got["blueprints"][dense]["ratio"] == 1.0
    s = got["blueprints"][sparse]
    assert s["tokens_per_step"] == 16 and s["ratio"] == pytest.approx(
        s["tokens_per_s"] / got["blueprints"][dense]["tokens_per_s"])
    assert s["step_s"] == pytest.approx(sum(s["parts_s"].values()))


def test_against_without_throughput_is_refused(tmp_path, capsys):
    dense = blueprint(tmp_path / "dense.yaml", {"kind": "gelu"})
    with pytest.raises(SystemExit) as e:
        param_count([dense, "--against", dense])
    assert e.value.code == 2 and "add --throughput" in capsys.readouterr().err


def test_an_mtp_module_costs_one_more_block_projection_and_head():
    def spec(mtp):
        body = {"vocab_size": 64, "context_length": 8, "d_model": 16, "n_layers": 2,
                "block": {"attention": {"kind": "causal", "n_heads": 2}, "mlp": {"kind": "gelu", "hidden_size": 32}}}
        return build_model_spec({**body, **({"mtp": mtp} if mtp else {})})
    plain, one, two = (workload(spec(m), batch=2) for m in (None, {"depth": 1}, {"depth": 2}))
    N, D, V = 16, 16, 64
    block = (plain.flops - 6 * N * D * V) / 2                   # the two blocks' share, per block
    assert one.flops - plain.flops == pytest.approx(block + 6 * N * (2 * D * D + D * V))
    assert two.flops - plain.flops == pytest.approx(2 * (one.flops - plain.flops))
    assert predict(two, FAKE).parts["mtp projection and head"] == pytest.approx(
        2 * predict(one, FAKE).parts["mtp projection and head"])
