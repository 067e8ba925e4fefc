"""Every config.json key a family reads, against transformers itself: its defaults (a key left out means what it
means to transformers), each boolean flipped (the same logits, or one clear refusal), transformers 4.x RoPE keys,
and the output head, tied or not, through import, export and back."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

import test_hf_families_more as more  # noqa: E402
import test_hf_interop as interop  # noqa: E402
from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.hf import FAMILIES, import_hf  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402
from test_hf_families_more import assert_logits_match  # noqa: E402
from test_hf_interop import V, hf_tokenizer_kind, ours_logits  # noqa: E402,F401


def tiny(monkeypatch, folder, name, **changes):
    """The tiny random model ``name`` of test_hf_interop / test_hf_families_more with ``changes`` made to its config
    (a qwen's ``layer_types`` are derived again from use_sliding_window and max_window_layers), saved in ``folder``."""
    module = interop if name in interop.CONFIGS else more
    base = module.CONFIGS[name]

    def config():
        kw = base().to_dict()
        if {"use_sliding_window", "sliding_window", "max_window_layers"} & set(changes):
            kw.pop("layer_types", None)
        return type(base()).from_dict({**kw, **changes})
    monkeypatch.setitem(module.CONFIGS, name, config)
    return module.tiny_hf(name, folder)


def imported(tmp_path, folder="hf", run="run"):
    model, _, _, _ = load_run_model(import_hf(tmp_path / folder, tmp_path / run).path)
    return model


def refused(tmp_path, capsys, folder="hf") -> str:
    capsys.readouterr()
    assert hf_main(["import", str(tmp_path / folder), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "refused").exists()
    return err


IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOW = {"use_sliding_window": True, "sliding_window": 3}

# ----------------------------------------------------------------------------------- each boolean key flipped
#: (family, config changes, None: the same logits as transformers | the refusal's words).  A key transformers'
#: model of the family ignores is flipped too: it must change nothing here either.
FLIPS = [
    ("llama", {"attention_bias": True}, None),
    ("llama", {"mlp_bias": True}, None),
    ("llama", {"tie_word_embeddings": True}, None),
    ("mistral", {"tie_word_embeddings": True}, None),
    ("mistral", {"attention_bias": True, "mlp_bias": True}, None),        # MistralAttention/MLP: never biased
    ("mistral", {"sliding_window": None}, None),                          # null: full attention
    ("qwen2", {"tie_word_embeddings": False}, None),
    ("qwen2", {"attention_bias": False, "mlp_bias": True}, None),         # q/k/v biased, MLP not, whatever these say
    ("qwen2", {**WINDOW, "max_window_layers": 1}, None),                  # layer 1 slides
    ("qwen2", {**WINDOW, "max_window_layers": 2}, None),                  # no layer does
    ("qwen2", {"use_sliding_window": False, "sliding_window": 3, "max_window_layers": 0}, None),  # window unused
    ("qwen3", {"attention_bias": True}, None),
    ("qwen3", {"mlp_bias": True}, None),                                  # Qwen3MLP: never biased
    ("qwen3", {"tie_word_embeddings": True}, None),
    ("qwen3", {**WINDOW, "max_window_layers": 1}, None),
    ("gpt2", {"tie_word_embeddings": False}, None),
    ("gpt2", {"reorder_and_upcast_attn": True}, None),                    # fp32 scores: the same function
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights false is not implemented"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx true is not implemented"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention true is not implemented"),
    ("mixtral", {"tie_word_embeddings": True}, None),
    ("mixtral", {"attention_bias": True}, None),                          # MixtralAttention: never biased
    ("mixtral", {"sliding_window": 3}, None),
    ("qwen3_moe", {"attention_bias": True}, None),
    ("qwen3_moe", {"norm_topk_prob": False}, None),
    ("qwen3_moe", {"tie_word_embeddings": True}, None),
    ("qwen3_moe", WINDOW, None),                                          # every layer slides
    ("olmoe", {"attention_bias": True}, None),
    ("olmoe", {"norm_topk_prob": True}, None),
    ("olmoe", {"tie_word_embeddings": True}, None),
    ("gpt_oss", {"attention_bias": False}, None),
    ("gpt_oss", {"tie_word_embeddings": True}, None),
    ("deepseek_v3_no_q_lora", {"attention_bias": False}, None),
    ("deepseek_v3", {"attention_bias": True}, None),
    ("deepseek_v3", {"rope_interleave": False}, None),
    ("deepseek_v3", {"tie_word_embeddings": True}, None),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob false is not implemented"),
]


@pytest.mark.parametrize("name, changes, refusal", FLIPS,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c, _ in FLIPS])
def test_flipped_key_matches_transformers_or_is_refused(tmp_path, monkeypatch, capsys, name, changes, refusal):
    tiny(monkeypatch, tmp_path / "hf", name, **changes)
    if refusal is not None:
        assert refusal in refused(tmp_path, capsys)
        return
    # the reference is what from_pretrained makes of the folder (eager: reorder_and_upcast_attn acts there only)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    for key, value in changes.items():
        if isinstance(value, bool):                           # what transformers read
            assert getattr(hf.config, key) is value, key
    assert_logits_match(hf, imported(tmp_path), IDX)


# ----------------------------------------------------------------------------- absent keys: transformers' defaults
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_defaults_are_those_of_transformers_config_classes(name):
    cls = transformers.CONFIG_MAPPING[name]
    fam = FAMILIES[name]
    declared = {cls.attribute_map.get(f.name, f.name): f.default for f in dataclasses.fields(cls)}
    for key, ours in fam.defaults.items():
        if key == "rope_theta":
            want = cls.default_theta
        elif key == "rope_parameters":                        # built by the class when config.json has none
            want = {k: v for k, v in cls().rope_parameters.items() if k != "rope_theta"}
        else:
            assert key in declared, f"{key} is no {cls.__name__} key"
            want = declared[key]
        assert ours == want, f"{name}: {key} defaults to {want!r} in transformers, {ours!r} here"
    assert dict(fam.aliases) == dict(cls.attribute_map)


#: tiny configs that leave as much as they can at transformers' defaults
DEFAULTY = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=8,
                                                  max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "mixtral": lambda: transformers.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24,
                                                  num_hidden_layers=2, num_attention_heads=8,
                                                  max_position_embeddings=64),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=40,
                                                     moe_intermediate_size=16, num_hidden_layers=2,
                                                     num_attention_heads=4, head_dim=8, num_experts=8,
                                                     max_position_embeddings=64),
    "olmoe": lambda: transformers.OlmoeConfig(vocab_size=V, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                              num_attention_heads=4, num_experts=8, max_position_embeddings=64),
    "gpt_oss": lambda: transformers.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=16,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16, num_local_experts=4, max_position_embeddings=64),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16),
}
#: keys each of those must leave out (so the test cannot pass on a config that states everything)
LEFT_OUT = {"llama": {"rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings", "rope_parameters"},
            "mistral": {"sliding_window", "num_key_value_heads"},
            "qwen2": {"use_sliding_window", "layer_types", "rope_parameters"},
            "qwen3": {"head_dim", "attention_bias"},
            "gpt2": {"tie_word_embeddings", "activation_function", "n_inner", "layer_norm_epsilon"},
            "mixtral": {"rope_parameters", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
                        "rms_norm_eps"},
            "qwen3_moe": {"num_key_value_heads", "num_experts_per_tok", "norm_topk_prob", "mlp_only_layers"},
            "olmoe": {"num_experts_per_tok", "norm_topk_prob", "num_key_value_heads"},
            "gpt_oss": {"rope_parameters", "sliding_window", "layer_types", "attention_bias", "num_experts_per_tok"},
            "deepseek_v3": {"routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
                            "n_shared_experts", "num_experts_per_tok", "rope_interleave", "norm_topk_prob"}}


def leave_out_defaults(folder, cls) -> set[str]:
    """Drop from ``folder``'s config.json every key whose absence gives transformers the same config."""
    f = folder / "config.json"
    full = json.loads(f.read_text())
    want = cls.from_dict(full).to_dict()
    kept = dict(full)
    for key in sorted(full):
        trial = {k: v for k, v in kept.items() if k != key}
        if key != "model_type" and cls.from_dict(trial).to_dict() == want:
            kept = trial
    f.write_text(json.dumps(kept))
    return set(full) - set(kept)


@pytest.mark.parametrize("name", sorted(DEFAULTY))
def test_a_config_that_leaves_keys_to_the_defaults(tmp_path, monkeypatch, name):
    monkeypatch.setitem(interop.CONFIGS, name, DEFAULTY[name])
    hf = interop.tiny_hf(name, tmp_path / "full")
    (tmp_path / "short").mkdir()
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        (tmp_path / "short" / f).write_bytes((tmp_path / "full" / f).read_bytes())
    left_out = leave_out_defaults(tmp_path / "short", type(hf.config))
    assert LEFT_OUT[name] <= left_out, LEFT_OUT[name] - left_out
    full, short = imported(tmp_path, "full", "run_full"), imported(tmp_path, "short", "run_short")
    assert yaml.safe_load((tmp_path / "run_short" / "blueprint.yaml").read_text())["model"] == \
        yaml.safe_load((tmp_path / "run_full" / "blueprint.yaml").read_text())["model"]
    assert_logits_match(hf, short, IDX)


# ----------------------------------------------------------------------------------- transformers 4.x RoPE keys
LEGACY = {  # (model, config.json rewrite of its rope_parameters into 4.x keys)
    "llama3": ("llama", lambda p: {"rope_theta": p["rope_theta"],
                                   "rope_scaling": {k: v for k, v in p.items() if k != "rope_theta"}}),
    "yarn_type": ("llama_yarn", lambda p: {"rope_theta": p["rope_theta"],
                                           "rope_scaling": {"type" if k == "rope_type" else k: v
                                                            for k, v in p.items() if k != "rope_theta"}}),
    "theta_only": ("qwen3", lambda p: {"rope_theta": p["rope_theta"], "rope_scaling": None}),
    # both: transformers takes rope_scaling (and the top-level rope_theta where that has none)
    "scaling_wins": ("llama", lambda p: {"rope_theta": p["rope_theta"], "rope_parameters": {"rope_type": "default"},
                                         "rope_scaling": {k: v for k, v in p.items() if k != "rope_theta"}}),
}


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_transformers_4_rope_keys(tmp_path, monkeypatch, case):
    name, rewrite = LEGACY[case]
    changes = {"rope_parameters": {"rope_type": "default", "rope_theta": 123456.0}} if case == "theta_only" else {}
    hf = tiny(monkeypatch, tmp_path / "hf", name, **changes)
    f = tmp_path / "hf" / "config.json"
    config = json.loads(f.read_text())
    params = config.pop("rope_parameters")
    f.write_text(json.dumps({**config, **rewrite(params)}))
    read = transformers.AutoConfig.from_pretrained(tmp_path / "hf").rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == params          # the same RoPE to transformers
    assert_logits_match(hf, imported(tmp_path), IDX)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_sliding_layers_from_max_window_layers(tmp_path, monkeypatch, name):
    """A config.json without layer_types (transformers 4.x): the layers from max_window_layers on slide."""
    hf = tiny(monkeypatch, tmp_path / "hf", name, **WINDOW, max_window_layers=1)
    f = tmp_path / "hf" / "config.json"
    config = json.loads(f.read_text())
    assert config.pop("layer_types") == ["full_attention", "sliding_attention"]
    f.write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").layer_types == hf.config.layer_types
    model = imported(tmp_path)
    assert [b.attention.window for b in model.spec.blocks] == [None, 3]
    assert_logits_match(hf, model, IDX)


# ----------------------------------------------------------------------------------- the output head
def test_untied_gpt2_imports_its_own_head(tmp_path, monkeypatch):
    """It used to import with exit 0 as a model whose head was the embedding."""
    monkeypatch.setitem(interop.CONFIGS, "untied", lambda: transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=32, tie_word_embeddings=False))
    hf = interop.tiny_hf("untied", tmp_path / "hf")
    assert "lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    model = imported(tmp_path)
    assert not model.spec.tie_embeddings
    assert torch.equal(model.head.weight, hf.lm_head.weight) and not torch.equal(model.head.weight, model.wte.weight)
    assert_logits_match(hf, model, IDX)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_tied_model_whose_files_also_hold_the_head(tmp_path, monkeypatch, capsys, name):
    """A copy equal to the embedding (some hub files have one) is accepted; a different head is refused, not
    dropped: config.json says the model is tied."""
    hf = tiny(monkeypatch, tmp_path / "hf", name)
    assert hf.config.tie_word_embeddings
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    assert "lm_head.weight" not in tensors                    # save_pretrained leaves a tied head out
    embedding = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    save_file({**tensors, "lm_head.weight": tensors[embedding].clone()}, f, metadata={"format": "pt"})
    assert_logits_match(hf, imported(tmp_path), IDX)
    save_file({**tensors, "lm_head.weight": tensors[embedding] + 1e-3}, f, metadata={"format": "pt"})
    err = refused(tmp_path, capsys)
    assert f"lm_head.weight differs from the embedding {embedding}" in err and "tie_word_embeddings" in err


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_head_round_trip(tmp_path, monkeypatch, tie):
    """import -> python -m nanodecoder.hf export -> from_pretrained: the same logits, the head as it was."""
    hf = tiny(monkeypatch, tmp_path / "hf", "gpt2", tie_word_embeddings=tie)
    model = imported(tmp_path)
    assert model.spec.tie_embeddings is tie
    assert hf_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is tie
    written, saved = (set(load_file(tmp_path / d / "model.safetensors")) for d in ("out", "hf"))
    assert written == saved                                   # lm_head.weight only when untied
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert (back.eval()(IDX).logits - hf(IDX).logits).abs().max().item() <= 1e-4
        assert (ours_logits(model, IDX) - hf(IDX).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name, changes", [("qwen2", {**WINDOW, "max_window_layers": 1}), ("qwen3_moe", WINDOW),
                                           ("mixtral", {"sliding_window": 3})])
def test_sliding_windows_round_trip(tmp_path, monkeypatch, name, changes):
    hf = tiny(monkeypatch, tmp_path / "hf", name, **changes)
    model = imported(tmp_path)
    assert hf_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == name
    with torch.no_grad():
        assert (back(IDX).logits - hf(IDX).logits).abs().max().item() <= 1e-4
        assert (ours_logits(model, IDX) - hf(IDX).logits).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------- RoPE kinds added later
@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    # Llama 4's published llama3 scaling has low_freq_factor == high_freq_factor (no ramp); it was refused
    {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
], ids=["linear", "llama3_no_ramp"])
def test_rope_scalings_match_transformers_and_export_back(tmp_path, monkeypatch, rope):
    hf = tiny(monkeypatch, tmp_path / "hf", "llama", rope_parameters=rope)
    model = imported(tmp_path)
    assert model.spec.positional.scaling.kind == rope["rope_type"]
    assert_logits_match(hf, model, IDX)
    assert hf_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters == {**rope}
    with torch.no_grad():
        torch.testing.assert_close(back(IDX).logits, hf(IDX).logits, atol=1e-5, rtol=0)
