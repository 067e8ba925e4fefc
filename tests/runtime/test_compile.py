"""torch.compile on the CPU (inductor + gcc): same losses as eager, bounded recompiles, clear failures.

Marked ``compile``: each test compiles a tiny model (seconds to tens of seconds on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

from nanodecoder.runtime import CompileFailed, RuntimeSetupError, graphs_compiled
from rthelpers import assert_close, dense_raw, moe_raw, run_steps, trainer_for

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("raw_fn", [dense_raw, moe_raw], ids=["dense", "moe"])
def test_compiled_training_matches_eager_without_recompiling(tmp_path, raw_fn):
    raw = raw_fn(tmp_path)
    raw["train"]["grad_accum"] = 1
    eager, _ = trainer_for(tmp_path, raw)
    compiled, rt = trainer_for(tmp_path, raw, compile=True)
    assert rt.compile and "compiled" in rt.describe()
    assert getattr(compiled.raw_model, "_compiled_call_impl", None) is not None   # in place: names unchanged
    assert list(compiled.raw_model.state_dict()) == list(eager.raw_model.state_dict())
    if raw_fn is moe_raw:   # eager takes torch._grouped_mm here; compiled fp32 must take the expert loop
        experts = eager.raw_model.blocks[0].mlp.experts
        assert experts.use_grouped_mm(torch.zeros(8, experts.dim))
    want, _ = run_steps(eager, 10)
    start = graphs_compiled()
    got, graphs = run_steps(compiled, 10)
    assert_close(got, want, 1e-4)
    # a few graphs in the first step (forward; an MoE's routing is data-dependent), none after:
    # the per-expert token counts are unbacked symbolic sizes, not a new specialisation per step
    assert graphs[0] - start <= 2 and graphs[-1] == graphs[1] == graphs[0]
    ev = compiled.evaluate()                       # eval mode: at most one more graph
    assert abs(ev["val_loss"] - eager.evaluate()["val_loss"]) / ev["val_loss"] < 1e-4
    assert graphs_compiled() - graphs[-1] <= 2


def test_a_compiler_failure_says_how_to_run_without_compiling(tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor
    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    raw = dense_raw(tmp_path)
    raw["model"]["d_model"] = 24                   # shapes no earlier test compiled
    trainer, _ = trainer_for(tmp_path, raw, compile=True)
    with pytest.raises(CompileFailed) as e:
        trainer.step()
    assert issubclass(CompileFailed, RuntimeSetupError)       # printed without a traceback by the CLI
    assert str(e.value).startswith("torch.compile failed (")
    assert "run without compiling: --set runtime.compile=false" in str(e.value)
    torch._dynamo.reset()
