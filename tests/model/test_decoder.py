"""The assembled decoder: building, meta device, init, overrides, KV cache, causality."""
import math

import pytest
import torch

from nanodecoder.model import build_model, build_model_spec, materialize
from nanodecoder.model.params import count_blueprint, count_params


def model_cfg(**over):
    cfg = {"vocab_size": 50, "context_length": 16, "d_model": 32, "n_layers": 4,
           "block": {"norm": {"kind": "rmsnorm"},
                     "attention": {"kind": "causal", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
                     "mlp": {"kind": "swiglu"}},
           "positional": {"kind": "rope"}}
    cfg.update(over)
    return cfg


def test_forward_backward_and_loss_near_uniform():
    torch.manual_seed(0)
    m = build_model(build_model_spec(model_cfg()))
    idx = torch.randint(0, 50, (3, 16))
    tgt = torch.randint(0, 50, (3, 16))
    out = m(idx, tgt)
    assert out.logits.shape == (3, 16, 50)
    assert abs(out.loss.item() - math.log(50)) < 0.2      # small init: near-uniform predictions
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m(idx).logits.shape == (3, 16, 50)               # inference: every position
    assert m(idx, logits_to_keep=1).logits.shape == (3, 1, 50)   # generation: the last one only


def test_forward_without_targets_gives_every_position_and_logits_to_keep_the_last():
    torch.manual_seed(0)
    m = build_model(build_model_spec(model_cfg())).eval()
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = m.logits(m.hidden(idx)[0])
        out = m(idx).logits
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(out, m(idx, idx).logits, rtol=0, atol=0)   # the training path's logits
        torch.testing.assert_close(m(idx, logits_to_keep=3).logits, want[:, -3:])   # a smaller matmul: rounding
    with pytest.raises(ValueError, match="logits_to_keep applies without targets"):
        m(idx, idx, logits_to_keep=1)
    for bad in (-1, 1.0, "1"):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            m(idx, logits_to_keep=bad)


def test_meta_build_uses_no_memory_and_materializes():
    spec = build_model_spec(model_cfg())
    meta = build_model(spec, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    real = materialize(meta, "cpu")
    assert real.head.weight is real.wte.weight
    assert torch.isfinite(real(torch.randint(0, 50, (1, 8))).logits).all()
    assert count_params(real).total == count_blueprint(spec).total


def test_gpt2_init_statistics():
    cfg = model_cfg(d_model=256, n_layers=8, vocab_size=512,
                    block={"attention": {"kind": "causal", "n_heads": 4}, "mlp": {"kind": "gelu"}})
    m = build_model(build_model_spec(cfg), seed=0)
    resid = 0.02 / math.sqrt(2 * 8)
    for block in m.blocks:
        assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
        assert abs(block.attn.out.weight.std().item() - resid) < resid * 0.1
        assert abs(block.mlp.down.weight.std().item() - resid) < resid * 0.1
        assert torch.all(block.norm1.weight == 1)
    zero = build_model(build_model_spec({**cfg, "init": {"kind": "gpt2", "zero_init_output": True}}))
    assert all(torch.all(b.attn.out.weight == 0) and torch.all(b.mlp.down.weight == 0) for b in zero.blocks)


def test_switch_init_statistics():
    cfg = model_cfg(d_model=256, n_layers=2, vocab_size=64, init={"kind": "switch", "scale": 0.1},
                    block={"attention": {"kind": "causal", "n_heads": 4}, "mlp": {"kind": "gelu"}})
    m = build_model(build_model_spec(cfg), seed=0)
    # truncated at +-2 sigma: std = sigma * sqrt(1 - 2*2*phi(2)/(2*Phi(2)-1))
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    shrink = math.sqrt(1 - 4 * phi2 / (2 * big_phi - 1))
    for lin, fan_in in [(m.blocks[0].attn.qkv, 256), (m.blocks[0].mlp.down, 1024)]:
        want = math.sqrt(0.1 / fan_in) * shrink
        assert abs(lin.weight.std().item() - want) < want * 0.05


def test_per_layer_overrides_every_other_layer():
    cfg = model_cfg(overrides=[{"layers": {"start": 1, "every": 2}, "mlp": {"kind": "relu2", "hidden_size": 48}},
                               {"layers": [0], "attention": {"kind": "causal", "n_heads": 2}}])
    spec = build_model_spec(cfg)
    kinds = [b.mlp.kind for b in spec.blocks]
    assert kinds == ["swiglu", "relu2", "swiglu", "relu2"]
    assert spec.blocks[1].mlp.hidden == 48
    assert spec.blocks[0].attention.n_heads == 2 and spec.blocks[2].attention.n_heads == 4


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = build_model(build_model_spec(model_cfg())).eval()
    idx = torch.randint(0, 50, (2, 12))
    full = m(idx, idx).logits
    cache = m.new_kv_cache(2)
    pieces = [m(idx[:, :5], cache=cache).logits[:, -1]]
    for t in range(5, 12):
        pieces.append(m(idx[:, t:t + 1], cache=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(pieces, 1), full[:, 4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_model_is_causal(positional):
    torch.manual_seed(0)
    m = build_model(build_model_spec(model_cfg(positional={"kind": positional}))).double().eval()
    idx = torch.randint(0, 50, (1, 16))
    base = m(idx, idx).logits
    idx2 = idx.clone()
    idx2[0, 9] = (idx2[0, 9] + 1) % 50
    out = m(idx2, idx2).logits
    torch.testing.assert_close(out[:, :9], base[:, :9], rtol=0, atol=1e-12)
    assert not torch.allclose(out[:, 9], base[:, 9])


def test_untied_head_has_its_own_weight():
    m = build_model(build_model_spec(model_cfg(tie_embeddings=False)))
    assert m.head.weight is not m.wte.weight
    rows = {r.name: r.count for r in count_params(m).rows}
    assert rows["output head (untied)"] == 50 * 32
