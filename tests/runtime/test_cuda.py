"""The CUDA code paths, run where a GPU is present (skipped elsewhere, so CI on CPUs skips them).

What only a GPU exercises: SDPA's CUDA kernels, TF32, bf16 autocast on CUDA, ``torch._grouped_mm``
for the MoE experts (bf16, eager and compiled), inductor's Triton kernels, the fused CUDA AdamW,
CUDA RNG state in checkpoints, and a checkpoint written on the GPU resumed on the CPU.
``tools/gpu_check.sh`` runs this file on a lent GPU machine together with the timing runs.
"""
from __future__ import annotations

import pytest
import torch

from nanodecoder.runtime import graphs_compiled
from rthelpers import assert_close, dense_raw, moe_raw, rows, run_steps, train_in_process, trainer_for, write

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RAWS = [dense_raw, moe_raw]
IDS = ["dense", "moe"]


@pytest.mark.parametrize("raw_fn", RAWS, ids=IDS)
def test_fp32_training_on_the_gpu_matches_the_cpu(tmp_path, raw_fn):
    raw = raw_fn(tmp_path)
    cpu, _ = trainer_for(tmp_path, raw)
    gpu, rt = trainer_for(tmp_path, raw, profile="gpu", tf32=False)
    assert rt.device.type == "cuda" and rt.precision == "fp32"
    assert next(gpu.raw_model.parameters()).is_cuda
    assert all(g.get("fused") for g in gpu.optimizer.param_groups)      # fused CUDA AdamW
    (want, _), (got, _) = run_steps(cpu, 6), run_steps(gpu, 6)
    assert_close(got, want, 1e-4 if raw_fn is dense_raw else 1e-3, "GPU vs CPU")


@pytest.mark.parametrize("raw_fn", RAWS, ids=IDS)
def test_bf16_autocast_and_tf32_track_fp32(tmp_path, raw_fn):
    raw = raw_fn(tmp_path)
    ref, _ = trainer_for(tmp_path, raw, profile="gpu", tf32=False)
    mixed, rt = trainer_for(tmp_path, raw, profile="gpu_mixed")
    assert rt.precision == "bf16" and torch.backends.cuda.matmul.allow_tf32
    if raw_fn is moe_raw:            # on CUDA in bf16 the experts run as one torch._grouped_mm
        experts = mixed.raw_model.blocks[0].mlp.experts
        with rt.autocast():
            assert experts.use_grouped_mm(torch.zeros(8, experts.dim, device=rt.device))
    (want, _), (got, _) = run_steps(ref, 10), run_steps(mixed, 10)
    assert all(torch.isfinite(torch.tensor(got)))
    assert_close(got, want, 3e-2, "bf16 vs fp32")
    assert got[-1] < got[0]
    assert next(mixed.raw_model.parameters()).dtype == torch.float32      # fp32 master weights


def test_grouped_mm_matches_the_expert_loop_and_a_float64_reference_on_cuda():
    from nanodecoder.components import component_spec
    from nanodecoder.components.moe import MoE
    spec = {"kind": "moe", "n_experts": 8, "top_k": 2, "expert_hidden": 64}

    def moe(dispatch: str) -> MoE:
        layer = component_spec("mlp", {**spec, "dispatch": dispatch}, d_model=32).build()
        assert isinstance(layer, MoE) and layer.spec.dispatch == dispatch
        return layer
    torch.manual_seed(0)
    layers = {d: moe(d).cuda() for d in ("grouped_mm", "loop")}
    layers["loop"].load_state_dict(layers["grouped_mm"].state_dict())
    ref = moe("loop").double()
    ref.load_state_dict(layers["grouped_mm"].state_dict())
    x = torch.randn(4, 64, 32)
    y_ref, _ = ref(x.double())
    y_ref.pow(2).sum().backward()
    for name, layer in layers.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert layer.experts.use_grouped_mm(torch.zeros(8, 32, device="cuda")) == (name == "grouped_mm")
            y, _ = layer(x.cuda())
        y.float().pow(2).sum().backward()
        err = (y.double().cpu() - y_ref).norm() / y_ref.norm()
        assert err < 1e-2, f"{name}: output relative error {err:.2e}"
        for (pname, p), q in zip(layer.named_parameters(), ref.parameters()):
            gerr = (p.grad.double().cpu() - q.grad).norm() / q.grad.norm()
            assert gerr < 3e-2, f"{name}: gradient of {pname} relative error {gerr:.2e}"


@pytest.mark.parametrize("raw_fn", RAWS, ids=IDS)
def test_compiled_bf16_training_matches_eager_on_cuda_without_recompiling(tmp_path, raw_fn):
    raw = raw_fn(tmp_path)
    raw["train"]["grad_accum"] = 1
    eager, _ = trainer_for(tmp_path, raw, profile="gpu_mixed")
    compiled, rt = trainer_for(tmp_path, raw, profile="gpu_mixed", compile=True)
    assert rt.compile
    want, _ = run_steps(eager, 10)
    start = graphs_compiled()
    got, graphs = run_steps(compiled, 10)
    assert_close(got, want, 1e-2)
    assert graphs[0] - start <= 2 and graphs[-1] == graphs[1] == graphs[0]


def test_a_checkpoint_written_on_the_gpu_resumes_on_the_cpu(tmp_path):
    from nanodecoder.cli.run import main
    raw = dense_raw(tmp_path)
    blueprint = write(tmp_path, raw, "dense.yaml")
    run = train_in_process(blueprint, tmp_path / "runs", "--profile", "gpu_mixed")
    last = rows(run, "train")[-1]
    assert last["step"] == 10
    assert main(["--resume", str(run), "--profile", "cpu", "--set", "train.steps=14"]) == 0
    after = [r for r in rows(run, "train") if r["step"] > 10]
    assert [r["step"] for r in after] == [11, 12, 13, 14]
    assert all(abs(r["loss"] - last["loss"]) < 0.5 for r in after), (after, last)
