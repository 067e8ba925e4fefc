"""Value embeddings, U-Net skips and multi-token prediction (model.value_embeddings, model.unet_skips, model.mtp):
each forward against a float64 reference written here from the equations, gradients to the new parameters, the
planner's rows, FLOPs and activation bytes against the built model, the KV-cache path, activation checkpointing,
bad options and the Hugging Face refusal."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nanodecoder.cli.blueprint import RunSpec, blueprint_model_spec
from nanodecoder.cli.catalog import catalog
from nanodecoder.config.validate import problems
from nanodecoder.hf import HFError, hf_family_for
from nanodecoder.model import build_model
from nanodecoder.model import plan as P
from nanodecoder.model.generate import generate
from nanodecoder.model.params import count_params
from nanodecoder.model.spec import build_model_spec
from nanodecoder.runtime.core import checkpoint_blocks
from test_plan import saved_bytes  # noqa: E402  (tests/model: autograd's saved storages, parameters left out)

BASE = {"vocab_size": 40, "context_length": 16, "d_model": 24, "n_layers": 4, "tie_embeddings": False,
        "block": {"attention": {"kind": "causal", "n_heads": 3, "bias": True}, "mlp": {"kind": "gelu"}}}
VE = {"value_embeddings": {"layers": [0, 2, 3]}}
SKIPS = {"unet_skips": {"weight": 0.5}}
MTP = {"mtp": {"depth": 2, "loss_weight": 0.3}}
ALL = {**VE, **SKIPS, **MTP}


def spec_of(**options):
    return build_model_spec({**BASE, **options})


def model_of(seed=0, dtype=torch.float64, **options):
    model = build_model(spec_of(**options), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():               # the mixing scalars and skip weights away from their start
        for name, p in model.named_parameters():
            if name.endswith(("value_embed.mix", "skips.weight")):
                p.copy_(0.3 + 1.4 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return model


def tokens(B=2, T=16, seed=0):
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the reference, from the equations
def ref_attention(attn, x, tokens, ve):
    """Causal multi-head attention written out; with a value embedding ``v = a v + b table[token]``."""
    B, T, D = x.shape
    H = attn.spec.n_heads
    E = D // H
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
    if ve is not None:
        a, b = ve.mix
        v = a * v + b * ve.table.weight[tokens]
    q, k, v = (t.view(B, T, H, E).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / E ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    return y @ attn.out.weight.T + attn.out.bias


def ref_block(block, x, tokens):
    """Pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x)) (the MLP is the model's own module: no trick touches it)."""
    ln = lambda norm, h: F.layer_norm(h, (h.shape[-1],), norm.weight, norm.bias, norm.spec.eps)  # noqa: E731
    x = x + ref_attention(block.attn, ln(block.norm1, x), tokens, getattr(block, "value_embed", None))
    return x + block.mlp(ln(block.norm2, x))[0]


def ref_forward(model, idx, targets):
    """(main cross-entropy, MTP loss or None, logits): modded-nanogpt's skips, DeepSeek-V3's section 2.2."""
    B, T = idx.shape
    n = len(model.blocks)
    x = model.wte.weight[idx] + model.pos.wpe.weight[:T]
    sources = list(model.skips.sources) if hasattr(model, "skips") else []
    sent = {}
    for i, block in enumerate(model.blocks):
        if n - 1 - i in sources:                            # block i receives block n-1-i's output
            x = x + model.skips.weight[sources.index(n - 1 - i)] * sent[n - 1 - i]
        x = ref_block(block, x, idx)
        if i in sources:
            sent[i] = x
    norm = lambda m, h: F.layer_norm(h, (h.shape[-1],), m.weight, m.bias, m.spec.eps)  # noqa: E731
    logits = norm(model.norm, x) @ model.head.weight.T
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    if not hasattr(model, "mtp"):
        return ce, None, logits
    h, losses = x, []
    for k, module in enumerate(model.mtp, 1):
        # h_i^k = TRM_k(M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]); here the model's final norm kind
        combined = torch.cat([norm(module.hnorm, h[:, :T - k]), norm(module.enorm, model.wte.weight[idx[:, k:]])], -1)
        h = ref_block(module.block, combined @ module.proj.weight.T, idx[:, :T - k])
        p = norm(module.norm, h) @ model.head.weight.T                   # the shared output head
        losses.append(F.cross_entropy(p.reshape(-1, p.size(-1)), targets[:, k:].reshape(-1)))
    return ce, model.spec.mtp.loss_weight / len(model.mtp) * sum(losses), logits


@pytest.mark.parametrize("options", [VE, SKIPS, MTP, ALL], ids=["value_embeddings", "unet_skips", "mtp", "all"])
def test_forward_equals_the_reference_from_the_equations(options):
    model = model_of(**options).train()
    idx, targets = tokens(), tokens(seed=1)
    out = model(idx, targets)
    ce, mtp, logits = ref_forward(model, idx, targets)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    close = dict(rtol=1e-6, atol=1e-6, check_dtype=False)      # the model takes its cross-entropies in fp32
    torch.testing.assert_close(out.ce_loss, ce, **close)        # ce_loss: the next-token loss only
    if mtp is None:
        assert out.mtp_loss is None and out.loss is out.ce_loss
    else:
        torch.testing.assert_close(out.mtp_loss, mtp, **close)
        torch.testing.assert_close(out.loss, ce + mtp, **close)
        assert set(out.stats) == {"mtp1.ce_loss", "mtp2.ce_loss"}


def test_the_tricks_change_the_model_only_where_chosen():
    plain, tricked = model_of(), model_of(**ALL)
    assert [hasattr(b, "value_embed") for b in tricked.blocks] == [True, False, True, True]
    assert tricked.skips.sources == (0, 1) and tricked.skips.into == {3: 0, 2: 1}     # 0 -> 3, 1 -> 2
    assert len(tricked.mtp) == 2
    assert not any(hasattr(m, "skips") or hasattr(m, "mtp") or hasattr(m, "value_embed") for m in plain.modules())


def test_gradients_reach_every_new_parameter():
    model = model_of(dtype=torch.float32, **ALL).train()
    model(tokens(), tokens(seed=1)).loss.backward()
    new = {name: p for name, p in model.named_parameters()
           if "value_embed" in name or name.startswith(("skips.", "mtp."))}
    assert any(n.startswith("mtp.1.block.mlp") for n in new) and "skips.weight" in new
    for name, p in new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_with_activation_checkpointing_the_loss_and_gradients_are_the_same():
    idx, targets = tokens(), tokens(seed=1)
    plain, recomputed = model_of(**ALL).train(), model_of(**ALL).train()
    checkpoint_blocks(recomputed)
    losses = []
    for model in (plain, recomputed):
        out = model(idx, targets)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------ generation
def test_kv_cache_decoding_equals_the_full_forward_and_mtp_is_unused():
    model = model_of(**ALL).eval()
    idx = tokens(T=12)
    calls = []
    for module in model.mtp:
        module.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():             # (step-by-step cached logits against the full forward: the conformance suite)
        full = model(idx).logits
        cache = model.new_kv_cache(2)
        first = model(idx[:, :7], cache=cache).logits
        rest = torch.cat([model(idx[:, t:t + 1], cache=cache).logits for t in range(7, 12)], dim=1)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-10, atol=1e-10)
        prompt = idx[:1, :4]
        assert torch.equal(generate(model, prompt, 8, temperature=0.0),
                           generate(model, prompt, 8, temperature=0.0, use_cache=False))
    assert calls == []                                      # generation never runs the MTP modules
    without = build_model(dataclasses.replace(model.spec, mtp=None)).to(torch.float64).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    without.load_state_dict(state)                          # every other weight is the model's
    with torch.no_grad():
        torch.testing.assert_close(without(idx).logits, full, rtol=0, atol=0)


def test_mtp_loss_needs_the_whole_sequence():
    model = model_of(**MTP)
    with pytest.raises(ValueError, match="without a KV cache"):
        model(tokens(), tokens(), cache=model.new_kv_cache(2))


# ------------------------------------------------------------------------------ the planner
MIXED = {**ALL, "overrides": [{"layers": [1], "attention": {"kind": "mla", "n_heads": 3, "kv_lora_rank": 8,
                                                             "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                                             "v_head_dim": 8}}],
         "positional": {"kind": "rope"}, "mtp": {"depth": 1, "block": {"attention": {"kind": "causal", "n_heads": 2},
                                                                       "mlp": {"kind": "moe", "n_experts": 4,
                                                                               "top_k": 2, "expert_hidden": 8}}}}


@pytest.mark.parametrize("options", [VE, SKIPS, MTP, MIXED], ids=["value_embeddings", "unet_skips", "mtp", "mixed"])
def test_planned_parameters_are_the_built_models(options):
    spec = spec_of(**options)
    analytic, built = P.param_report(spec), count_params(build_model(spec, device="meta"))
    assert [(r.name, r.count, round(r.active)) for r in analytic.rows] == \
        [(r.name, r.count, round(r.active)) for r in built.rows]
    assert (analytic.total, analytic.active, analytic.embedding) == (built.total, built.active, built.embedding)
    real = build_model(spec, seed=0)
    assert analytic.total == sum(p.numel() for p in real.parameters())


def test_the_rows_by_hand():
    spec = spec_of(**ALL)
    rows = {r.name: r.count for r in P.param_report(spec).rows}
    V, D = BASE["vocab_size"], BASE["d_model"]
    assert rows["value embeddings"] == 3 * (V * D + 2)                   # three layers: a table and a, b each
    assert rows["skip weights (unet)"] == 2
    assert rows["mtp projection"] == 2 * 2 * D * D                      # M_k [d, 2d], two modules
    assert rows["mtp norm (layernorm)"] == 2 * 3 * 2 * D + 2 * 2 * 2 * D  # hnorm, enorm, norm + the blocks' two
    assert rows["mtp attention (causal)"] == 2 * rows["attention (causal)"] / 4
    assert P.param_report(spec).embedding == V * D + BASE["context_length"] * D + rows["value embeddings"]


def test_flops_count_the_mtp_modules_as_torch_does():
    unbiased = {"block": {"attention": {"kind": "causal", "n_heads": 3}, "mlp": {"kind": "gelu"}}}  # (FLOPs: 2/weight)
    spec = spec_of(**MTP, **unbiased)                       # plain causal attention: SDPA, no aten.mm for the scores
    model = build_model(spec, seed=0).train()
    B, T = 2, 16
    with FlopCounterMode(display=False) as counter:
        model(tokens(B, T), tokens(B, T, seed=1))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    f = P.flops(spec, T)
    assert counts["aten.mm"] == (f.block_matmuls + f.head) * B * T
    plain = P.flops(spec_of(**unbiased), T)
    D, V, layer = BASE["d_model"], BASE["vocab_size"], plain.block_matmuls / 4
    assert f.block_matmuls - plain.block_matmuls == pytest.approx(sum((T - k) / T * (4 * D * D + layer)
                                                                      for k in (1, 2)))
    assert f.head - plain.head == pytest.approx(sum((T - k) / T * 2 * D * V for k in (1, 2)))
    assert P.flops(spec_of(**VE, **SKIPS, **unbiased), T) == plain    # lookups and additions: no matmul FLOPs


@pytest.mark.parametrize("options", [VE, SKIPS, MTP, ALL], ids=["value_embeddings", "unet_skips", "mtp", "all"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planned_activations_are_what_autograd_saves(options, precision):
    spec = build_model_spec({**BASE, "context_length": 64, "d_model": 64, "positional": {"kind": "rope"},
                             "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 4},
                                       "mlp": {"kind": "gelu"}}, **options})
    torch.manual_seed(0)
    model = build_model(spec).train()
    B, T = 3, 64
    idx = torch.randint(0, spec.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, idx, torch.bfloat16 if precision == "bf16" else None)
    p = P.plan(spec, P.Setting(context=T, batch=B, precision=precision, device="cpu"))
    assert p.acts.saved + p.memory(False).weight_copies == pytest.approx(measured, rel=0.02)


# ------------------------------------------------------------------------------ bad options, Hugging Face
@pytest.mark.parametrize("options,where,says", [
    ({"value_embeddings": {"layers": [1, 7]}}, "model.value_embeddings.layers[1]", "layer 7 does not exist"),
    ({"value_embeddings": {}, "overrides": [{"layers": [2], "attention": {
        "kind": "mla", "n_heads": 3, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
        "v_head_dim": 8}}], "positional": {"kind": "rope"}}, "model.value_embeddings.layers", "takes no value"),
    ({"unet_skips": {"layers": [0, 2]}}, "model.unet_skips.layers", "layer 2's output would go into layer 1"),
    ({"unet_skips": {"layers": {"start": 3}}}, "model.unet_skips.layers", "not after it"),
    ({"mtp": {"depth": 0}}, "model.mtp.depth", ">= 1"),
    ({"mtp": {"depth": 16}}, "model.mtp.depth", "leaves no position"),
    ({"mtp": {"deep": 1}}, "model.mtp", "deep"),
    ({"value_embeddings": {"layer": [0]}}, "model.value_embeddings", "layer"),
])
def test_a_bad_option_is_one_clear_line_naming_the_key(options, where, says):
    found = problems({"model": {**BASE, **options}}, {}, "bp.yaml", RunSpec, catalog())
    assert len(found) == 1, found
    text = str(found[0])
    assert where in text and says in text and "\n" not in text, text


@pytest.mark.parametrize("options,key", [(VE, "value_embeddings"), (SKIPS, "unet_skips"), (MTP, "mtp")])
def test_hugging_face_export_is_refused_in_one_line(options, key):
    llama = {**BASE, "tie_embeddings": False, "positional": {"kind": "rope"},
             "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 3},
                       "mlp": {"kind": "swiglu"}}}
    assert hf_family_for(build_model_spec(llama))[0].model_type == "llama"
    with pytest.raises(HFError) as e:
        hf_family_for(build_model_spec({**llama, **options}))
    assert f"model.{key}" in str(e.value) and "\n" not in str(e.value)


def test_a_deepseek_v3_export_records_its_mtp_module_and_leaves_it_out():
    _, spec = blueprint_model_spec("zoo/deepseek_v3")               # planned only: nothing is built
    fam, config = hf_family_for(spec)
    assert fam.model_type == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    deeper = dataclasses.replace(spec, mtp=dataclasses.replace(spec.mtp, depth=2))
    assert hf_family_for(deeper)[1]["num_nextn_predict_layers"] == 2
    assert hf_family_for(dataclasses.replace(spec, mtp=None))[1]["num_nextn_predict_layers"] == 0
