"""On-disk expert layouts: the fused tensors transformers 5 keeps in memory, written straight to safetensors,
import like the per-expert tensors that its save_pretrained writes (DeepSeek-V3's: test_hf_families_more.py)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.hf import import_hf  # noqa: E402
from test_hf_families_more import assert_logits_match  # noqa: E402
from test_hf_interop import CONFIGS, V, hf_tokenizer_kind, tiny_hf  # noqa: E402,F401


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_fused_experts_on_disk(tmp_path, name):
    hf = tiny_hf(name, tmp_path / "hf")
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any("gate_up_proj" in n for n in saved)            # save_pretrained: one tensor per expert
    assert any(".experts.0." in n for n in saved)
    config = CONFIGS[name]()
    E = config.num_local_experts if name == "mixtral" else config.num_experts
    H, I = config.hidden_size, (config.moe_intermediate_size if name == "qwen3_moe" else config.intermediate_size)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)     # gate then up
    assert state["model.layers.0.mlp.experts.down_proj"].shape == (E, H, I)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        (fused / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    model, _, _, _ = load_run_model(import_hf(fused, tmp_path / "run").path)
    assert_logits_match(hf, model, torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1)))
