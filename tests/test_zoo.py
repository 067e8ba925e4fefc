"""blueprints/zoo/: today's architectures as YAML, counted exactly (meta build == analytic == published config),
and each one, scaled down, trains and decodes through its KV cache."""
from __future__ import annotations

import copy

import pytest
import torch

from nanodecoder.cli.blueprint import RunSpec, blueprint_model_spec, load_blueprint, run_spec
from nanodecoder.cli.catalog import catalog
from nanodecoder.config.validate import problems
from nanodecoder.model import build_model
from nanodecoder.model.generate import generate
from nanodecoder.model.params import count_blueprint
from nanodecoder.resources import blueprints_dir
from nanodecoder.model.plan import param_report
from trainhelpers import fit_pattern

# figure: (total, active per token without the input embedding or None when not published that way)
FIGURES = {
    "gpt2_124m": (124_439_808, None),
    "gpt2_medium": (354_823_168, None),
    "llama3_1_8b": (8_030_261_248, None),
    "mixtral_8x7b": (46_702_792_704, None),
    "gemma2_2b": (2_614_341_888, None),
    "gemma3_4b": (3_880_263_168, None),
    "gpt_oss_120b": (116_829_156_672, 5_132_849_472),
    "deepseek_v3": (671_026_404_352, 36_625_603_584),
    "qwen3_8b": (8_190_735_360, None),
    "qwen3_30b_a3b": (30_532_122_624, None),
    "olmoe_1b_7b": (6_919_161_856, None),
}
ACTIVE_WITH_BOTH_EMBEDDINGS = {"deepseek_v3": 37_552_282_624, "qwen3_30b_a3b": 3_353_032_704,
                               "olmoe_1b_7b": 1_282_017_280}
ZOO = sorted(p.stem for p in (blueprints_dir() / "zoo").glob("*.yaml"))


def test_every_zoo_blueprint_has_its_figure():
    assert ZOO == sorted(FIGURES)


@pytest.mark.parametrize("name", ZOO)
def test_counted_exactly_two_ways(name):
    _, spec = blueprint_model_spec(f"zoo/{name}")
    total, active_no_input = FIGURES[name]
    built = count_blueprint(spec)                       # summing the parameters of the meta-device module
    analytic = param_report(spec)                       # from the spec alone
    # the published figures are the main model's: without the multi-token-prediction module (deepseek_v3's)
    mtp = [r for r in analytic.rows if r.name.startswith("mtp ")]
    main, main_active = analytic.total - sum(r.count for r in mtp), analytic.active - round(sum(r.active for r in mtp))
    assert built.total == analytic.total and main == total
    assert built.active == analytic.active
    if active_no_input is not None:
        assert main_active - spec.vocab_size * spec.d_model == active_no_input
    if name in ACTIVE_WITH_BOTH_EMBEDDINGS:
        assert main_active == ACTIVE_WITH_BOTH_EMBEDDINGS[name]
    if name == "mixtral_8x7b":
        assert round(analytic.active / 1e8) == 129      # "about 12.9B active"


def test_deepseek_v3_with_its_mtp_module_counts_the_published_layout():
    # README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: main model 671B; MTP module "11.5B unique parameters, excluding
    # the shared 0.9B Embedding and 0.9B output Head"; the Hugging Face card: 685B = 671B + 14B of MTP weights
    # (the checkpoint stores the module's own copies of the embedding and the head)
    _, spec = blueprint_model_spec("zoo/deepseek_v3")
    assert spec.mtp.depth == 1 and spec.mtp_block == spec.blocks[-1]          # num_nextn_predict_layers: 1
    analytic = param_report(spec)
    assert count_blueprint(spec).total == analytic.total == 682_636_472_320
    mtp = sum(r.count for r in analytic.rows if r.name.startswith("mtp "))
    assert mtp == 11_610_067_968 and analytic.total - mtp == 671_026_404_352
    copies = 2 * spec.vocab_size * spec.d_model                               # embed_tokens, shared_head.head
    assert round((mtp + copies) / 1e9) == 13 and round((analytic.total + copies) / 1e8) == 6845


def scaled_down(raw: dict) -> dict:
    """The same structure with toy widths: every attention, MLP and RoPE block shrunk alike."""
    m = copy.deepcopy(raw)
    firsts = [min(o["layers"]) if isinstance(o["layers"], list) else o["layers"].get("start", 0)
              for o in m.get("overrides", [])]
    m.update(vocab_size=64, context_length=32, d_model=32, n_layers=max([4] + [i + 1 for i in firsts]))
    for part in [m["block"], *m.get("overrides", [])]:
        att = part.get("attention")
        if att and att["kind"] == "mla":
            att.update(n_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8)
        elif att:
            att.update(n_heads=4, n_kv_heads=2 if att.get("n_kv_heads") else None)
            for key, small in (("head_dim", 8), ("window", 4)):
                if key in att:
                    att[key] = small
        mlp = part.get("mlp")
        if mlp and mlp["kind"] == "moe":
            mlp.update(n_experts=4, top_k=2, expert_hidden=16)
            if mlp["router"].get("n_group", 1) > 1:
                mlp["router"].update(n_group=2, topk_group=1)
        elif mlp and "hidden_size" in mlp:
            mlp["hidden_size"] = 48
    scaling = m.get("positional", {}).get("scaling")
    if scaling:
        scaling["original_max_position_embeddings"] = 16
    return m


@pytest.mark.parametrize("name", ZOO)
def test_scaled_down_trains_20_steps_and_samples_with_the_cache(name):
    bp = load_blueprint(f"zoo/{name}")
    raw = {"model": scaled_down(bp.raw["model"])}
    assert problems(raw, {}, name, RunSpec, catalog()) == []          # still a valid blueprint
    spec = run_spec(raw).model
    model = build_model(spec, seed=0)
    losses, data = fit_pattern(model, 64, repeats=50)
    assert losses[-1] < 0.8 * losses[0], losses
    prompt = data[:5].unsqueeze(0)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0),
                       generate(model, prompt, 12, temperature=0.0, use_cache=False))
