"""Hugging Face import/export against transformers itself: tiny random models, every tensor randomised."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nanodecoder.cli.sample import load_run_model  # noqa: E402
from nanodecoder.data import kinds  # noqa: E402
from nanodecoder.hf import HFError, HFTokenizer, export_hf, import_hf  # noqa: E402
from nanodecoder.hf.__main__ import main as hf_main  # noqa: E402
from nanodecoder.model.generate import generate  # noqa: E402

V = 96
ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, intermediate_size=48, num_key_value_heads=2,
                                              rope_theta=500000.0, **ATTN,
                                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(vocab_size=V, intermediate_size=48, num_key_value_heads=2,
                                                  sliding_window=5, **ATTN),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=V, intermediate_size=48, num_key_value_heads=2,
                                              tie_word_embeddings=True, **ATTN),
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=V, intermediate_size=48, num_key_value_heads=2,
                                              head_dim=16, **ATTN),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "mixtral": lambda: transformers.MixtralConfig(vocab_size=V, intermediate_size=24, num_key_value_heads=2,
                                                  num_local_experts=4, num_experts_per_tok=2, **ATTN),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(vocab_size=V, intermediate_size=40, moe_intermediate_size=24,
                                                     num_key_value_heads=2, head_dim=16, num_experts=4,
                                                     num_experts_per_tok=2, norm_topk_prob=True,
                                                     mlp_only_layers=[1], **ATTN),
    "olmoe": lambda: transformers.OlmoeConfig(vocab_size=V, intermediate_size=24, num_key_value_heads=4,
                                              num_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, **ATTN),
}
MOE = {"mixtral", "qwen3_moe", "olmoe"}


@pytest.fixture(autouse=True)
def hf_tokenizer_kind(monkeypatch):
    """Until data/kinds.py registers the ``hf`` kind, give load_tokenizer a catalog that has it."""
    if "hf" not in kinds.data_catalog()["tokenizer"]:
        cat = kinds.make_catalog(kinds.register)
        cat["tokenizer"].add("hf", HFTokenizer)
        monkeypatch.setattr(kinds, "data_catalog", lambda: cat)


def write_tokenizer(folder, vocab=V):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def tiny_hf(name, folder, seed=0, **save):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():                   # HF starts norms at 1 and biases at 0: that would hide a swap
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for n, b in hf.named_buffers():
            if n in hf.state_dict() and b.is_floating_point():
                b.copy_(torch.randn_like(b))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder, **save)
    write_tokenizer(folder)
    return hf


def imported(tmp_path, name, **save):
    hf = tiny_hf(name, tmp_path / "hf", **save)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, _, _ = load_run_model(run.path)
    return hf, model, tok, run


def ours_logits(model, idx):
    x, _, _ = model.hidden(idx)
    return model.logits(x)


def router_indices(model):
    seen = {}
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append(o.indices))
             for k, b in enumerate(model.blocks) if hasattr(b.mlp, "router")]
    return seen, hooks


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers(tmp_path, name):
    hf, model, tok, run = imported(tmp_path, name)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours_logits(model, idx)
        assert (got - want).abs().max().item() <= 1e-4
        cache = model.new_kv_cache(2, 16)       # token by token through our KV cache
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache).logits for t in range(idx.size(1))], dim=1)
        assert (steps - want).abs().max().item() <= 1e-4
    if name in MOE:                              # the same experts for every token
        seen, hooks = router_indices(model)
        theirs = {}
        hf_hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, k=k: theirs.update({k: o[2]}))
                    for k, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
        with torch.no_grad():
            model(idx), hf(idx)
        for h in hooks + hf_hooks:
            h.remove()
        assert sorted(seen) == sorted(theirs) and seen
        for k in seen:
            assert torch.equal(seen[k][0].sort(-1).values, theirs[k].sort(-1).values)
    assert_same_greedy_tokens(hf, model, idx[:1, :4])


def assert_same_greedy_tokens(hf, model, prompt, n: int = 20):
    """Our greedy decoding, with and without the KV cache, gives transformers' ``generate`` ids."""
    want = hf.generate(prompt, max_new_tokens=n, do_sample=False)
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, n, temperature=0.0, use_cache=use_cache), want)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers(tmp_path, name):
    hf, model, tok, run = imported(tmp_path, name)
    assert hf_main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.model_type == name
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert (back.eval()(idx).logits - ours_logits(model, idx)).abs().max().item() <= 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))


def test_export_of_a_native_model_and_refusal(tmp_path):
    from nanodecoder.model import build_model, build_model_spec
    base = {"vocab_size": V, "context_length": 32, "d_model": 32, "n_layers": 2, "tie_embeddings": False,
            "positional": {"kind": "rope"}, "block": {"norm": {"kind": "rmsnorm", "eps": 1e-5},
                                                       "attention": {"kind": "causal", "n_heads": 4},
                                                       "mlp": {"kind": "swiglu"}}}
    model = build_model(build_model_spec(base), seed=0).eval()
    export_hf(model, None, tmp_path / "a")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert back.config.model_type == "llama"
    idx = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (back(idx).logits - ours_logits(model, idx)).abs().max().item() <= 1e-4
    base["block"]["attention"]["logit_softcap"] = 50.0
    with pytest.raises(HFError, match="no Hugging Face family"):
        export_hf(build_model(build_model_spec(base)), None, tmp_path / "b")


def test_sharded_checkpoint_and_weights_only_manifest(tmp_path):
    hf, model, tok, run = imported(tmp_path, "llama", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    idx = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert (hf(idx).logits - ours_logits(model, idx)).abs().max().item() <= 1e-4
    manifest = json.loads(next((run.path / "ckpt").glob("step_*/manifest.json")).read_text())
    assert manifest["weights_only"] is True
    assert tok.decode(tok.encode("t1 t5 t7")) == "t1 t5 t7"


def test_sample_cli_on_imported_run(tmp_path, capsys):
    from nanodecoder.cli.sample import main as sample_main
    tiny_hf("qwen2", tmp_path / "hf")
    assert hf_main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert sample_main([str(tmp_path / "run"), "--prompt", "t3 t4", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("t3 t4")


def _edit_config(folder, **changes):
    f = folder / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _edit_weights(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("model_type", "model_type 'falcon' is not supported"),
    ("quantized", "quantization_config"),
    ("rope", "rope type 'dynamic' is not implemented"),
    ("shape", "model.layers.0.self_attn.k_proj.weight has shape"),
    ("unused", "model.layers.0.extra.weight not used"),
    ("missing_tensor", "model.layers.1.mlp.up_proj.weight is missing"),
    ("missing_shard", "shard model-00002-of-"),
])
def test_errors_are_one_clear_line(tmp_path, capsys, case, message):
    d = tmp_path / "hf"
    tiny_hf("llama", d, **({"max_shard_size": "20KB"} if case == "missing_shard" else {}))
    if case == "model_type":
        _edit_config(d, model_type="falcon")
    elif case == "quantized":
        _edit_config(d, quantization_config={"quant_method": "gptq", "bits": 4})
    elif case == "rope":
        _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    elif case == "shape":
        _edit_weights(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    elif case == "unused":
        _edit_weights(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    elif case == "missing_tensor":
        _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "missing_shard":
        next(d.glob("model-00002-of-*.safetensors")).unlink()
    capsys.readouterr()
    assert hf_main(["import", str(d), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_package_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import nanodecoder.hf, nanodecoder.hf.__main__\n"
            "assert sys.modules['transformers'] is None")
    subprocess.run([sys.executable, "-c", code], check=True)
