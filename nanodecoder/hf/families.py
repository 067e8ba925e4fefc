"""The Hugging Face model families we convert exactly, one :class:`Family` each.

A family knows three things:

``to_model(config)``   a ``config.json`` mapping -> our ``model:`` section (a plain dict, validated later
                       like any blueprint); anything we do not implement is an :class:`HFError` naming it;
``to_config(spec)``    our built ModelSpec -> the ``config.json`` transformers writes for that family;
``rules(spec, names)`` the tensor mapping table (``rules.py``), one rule per tensor of our state dict;
                       ``names`` (the tensors in the files) picks between equivalent on-disk layouts.

Export picks the family whose ``to_model(to_config(spec))`` gives back exactly ``spec`` (``convert.py``),
so the two directions cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .rules import HFError, Rule, concat, experts_down, experts_up, fused_experts, same, transposed



def _get(config: dict, key: str, default: Any = ...):
    if key in config and config[key] is not None:
        return config[key]
    if default is ...:
        raise HFError(f"config.json has no '{key}', which a {config.get('model_type')} model needs")
    return default


# ------------------------------------------------------------------------------------------ pieces
def rope_section(config: dict) -> dict:
    """Our ``positional:`` for a config's RoPE (transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"kind": "rope", "theta": float(theta)}
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        out["partial"] = float(partial)
    if rope_type == "default":
        return out
    if rope_type == "llama3":
        out["scaling"] = {"kind": "llama3", "factor": float(params["factor"]),
                          "low_freq_factor": float(params["low_freq_factor"]),
                          "high_freq_factor": float(params["high_freq_factor"]),
                          "original_max_position_embeddings": int(params["original_max_position_embeddings"])}
        return out
    raise HFError(f"config.json: rope type '{rope_type}' is not implemented (we convert default and llama3); "
                  "the model would not be the same")


def rope_config(positional) -> dict:
    """The inverse of :func:`rope_section`, in transformers 5's ``rope_parameters`` (and 4.x's keys)."""
    if positional.kind != "rope":
        raise HFError(f"positional kind '{positional.kind}' has no Hugging Face llama-family equivalent")
    params: dict[str, Any] = {"rope_theta": positional.theta, "rope_type": "default"}
    s = positional.scaling
    if s is not None:
        if s.kind != "llama3":
            raise HFError(f"rope scaling '{s.kind}' is not exported (we export llama3)")
        params.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                      high_freq_factor=s.high_freq_factor,
                      original_max_position_embeddings=s.original_max_position_embeddings)
    out = {"rope_parameters": params, "rope_theta": positional.theta}
    if positional.partial != 1.0:
        out["partial_rotary_factor"] = positional.partial
        params["partial_rotary_factor"] = positional.partial
    return out


def _check_common(config: dict) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise HFError(f"config.json has a quantization_config (quant_method '{method}'): quantized checkpoints "
                      "are not converted; use the unquantized (float) weights")
    for t in config.get("layer_types") or ():
        if t != "full_attention":
            raise HFError(f"config.json: layer type '{t}' is not implemented here (only full_attention)")


def _silu(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"config.json: hidden_act '{act}' is not implemented for this family (silu only)")


def llama_model(config: dict, *, bias=None, qk_norm: str | None = None, window: bool = False) -> dict:
    """The ``model:`` section shared by the llama-shaped families (everything but the MLP)."""
    _check_common(config)
    d, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    attn: dict[str, Any] = {"kind": "causal", "n_heads": heads,
                            "n_kv_heads": int(_get(config, "num_key_value_heads", heads))}
    head_dim = config.get("head_dim")
    if head_dim and head_dim != d // heads:
        attn["head_dim"] = int(head_dim)
    if bias is None:
        bias = bool(config.get("attention_bias", False))
    if bias:
        attn["bias"] = bias
    if qk_norm:
        attn.update(qk_norm=True, qk_norm_scope=qk_norm, qk_norm_eps=float(_get(config, "rms_norm_eps")))
    sliding = config.get("sliding_window")
    if window and sliding:
        attn["window"] = int(sliding)
    elif config.get("use_sliding_window"):
        raise HFError("config.json: use_sliding_window is true; sliding-window layers of this family are not "
                      "implemented here")
    if config.get("clip_qkv") is not None:
        raise HFError(f"config.json: clip_qkv {config['clip_qkv']} is not implemented")
    return {"vocab_size": int(_get(config, "vocab_size")), "pad_vocab_to": 1,
            "context_length": int(_get(config, "max_position_embeddings")), "d_model": d,
            "n_layers": int(_get(config, "num_hidden_layers")),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "positional": rope_section(config),
            "block": {"norm": {"kind": "rmsnorm", "eps": float(_get(config, "rms_norm_eps"))}, "attention": attn}}


def llama_config(spec, model_type: str, architecture: str) -> dict:
    """The llama-shaped part of ``config.json`` (callers add the MLP's keys)."""
    a, norm = spec.block.attention, spec.block.norm
    if a.kind != "causal" or norm.kind != "rmsnorm":
        raise HFError(f"the {model_type} family needs causal attention and rmsnorm")
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_size,
            "max_position_embeddings": spec.context_length, "rms_norm_eps": norm.eps, "hidden_act": "silu",
            "tie_word_embeddings": spec.tie_embeddings, "attention_dropout": 0.0, "dtype": "float32",
            **rope_config(spec.positional)}


def swiglu_mlp(hidden: int, bias: bool = False) -> dict:
    return {"kind": "swiglu", "hidden_size": int(hidden), **({"bias": True} if bias else {})}


def moe_mlp(config: dict, n_experts: int, top_k: int, hidden: int, renormalize: bool) -> dict:
    if top_k == 1 and renormalize:
        raise HFError("config.json: top-1 routing with renormalised weights (weight 1) is not implemented "
                      "(our top-1 router weighs by the softmax probability)")
    return {"kind": "moe", "n_experts": int(n_experts), "top_k": int(top_k), "expert_kind": "swiglu",
            "expert_hidden": int(hidden), "router": {"kind": "topk", "renormalize": bool(renormalize)},
            "lb_loss_coef": float(config.get("router_aux_loss_coef", 0.01)),
            "z_loss_coef": float(config.get("router_z_loss_coef", 0.0))}


# ------------------------------------------------------------------------------------------ rules
def attention_rules(a, ours: str, hf: str) -> list[Rule]:
    """q/k/v/o projections (fused qkv ours), their biases and q/k norms of a llama-shaped layer."""
    sizes = [a.widths[x] for x in "qkv"]
    rules = [concat(ours + "qkv.weight", [f"{hf}{x}_proj.weight" for x in "qkv"], sizes),
             same(ours + "out.weight", hf + "o_proj.weight")]
    if a.biased >= set("qkv"):
        rules.append(concat(ours + "qkv.bias", [f"{hf}{x}_proj.bias" for x in "qkv"], sizes))
    else:
        rules += [same(f"{ours}{x}_bias", f"{hf}{x}_proj.bias") for x in sorted(a.biased & set("qkv"))]
    if "o" in a.biased:
        rules.append(same(ours + "out.bias", hf + "o_proj.bias"))
    if a.qk_norm:
        rules += [same(ours + "q_norm.weight", hf + "q_norm.weight"), same(ours + "k_norm.weight", hf + "k_norm.weight")]
    return rules


def mlp_rules(m, ours: str, layer: str, names: set[str], moe_prefix: str, expert_names: tuple[str, str, str]
              ) -> list[Rule]:
    """A dense SwiGLU (``mlp.{gate,up,down}_proj``) or an MoE in either on-disk expert layout."""
    if m.kind == "swiglu":
        hf = layer + "mlp."
        rules = [concat(ours + "up.weight", [hf + "gate_proj.weight", hf + "up_proj.weight"], [m.hidden] * 2),
                 same(ours + "down.weight", hf + "down_proj.weight")]
        if m.bias:
            rules += [concat(ours + "up.bias", [hf + "gate_proj.bias", hf + "up_proj.bias"], [m.hidden] * 2),
                      same(ours + "down.bias", hf + "down_proj.bias")]
        return rules
    if m.kind != "moe" or m.expert_kind != "swiglu" or m.bias or m.n_shared_experts or m.router.kind != "topk":
        raise HFError(f"an mlp of kind '{m.kind}' has no equivalent in this family")
    fused = layer + "mlp.experts.gate_up_proj"
    if fused in names:                                  # transformers 5's in-memory layout, saved as is
        hf = layer + "mlp."
        return [same(ours + "router.weight", hf + "gate.weight"),
                fused_experts(ours + "experts.up", hf + "experts.gate_up_proj"),
                fused_experts(ours + "experts.down", hf + "experts.down_proj")]
    hf = layer + moe_prefix
    gate, up, down = expert_names
    e = range(m.n_experts)
    return [same(ours + "router.weight", hf + "gate.weight"),
            experts_up(ours + "experts.up", [f"{hf}experts.{i}.{gate}.weight" for i in e],
                       [f"{hf}experts.{i}.{up}.weight" for i in e]),
            experts_down(ours + "experts.down", [f"{hf}experts.{i}.{down}.weight" for i in e])]


def llama_rules(spec, names: set[str], moe_prefix: str = "mlp.",
                expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    rules = [same("wte.weight", "model.embed_tokens.weight"), same("norm.weight", "model.norm.weight")]
    if not spec.tie_embeddings:
        rules.append(same("head.weight", "lm_head.weight"))
    for i, b in enumerate(spec.blocks):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        rules += [same(ours + "norm1.weight", hf + "input_layernorm.weight"),
                  same(ours + "norm2.weight", hf + "post_attention_layernorm.weight"),
                  *attention_rules(b.attention, ours + "attn.", hf + "self_attn."),
                  *mlp_rules(b.mlp, ours + "mlp.", hf, names, moe_prefix, expert_names)]
    return rules


# ------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    to_model: Callable[[dict], dict]
    to_config: Callable[[Any], dict]
    rules: Callable[[Any, set[str]], list[Rule]]
    ignored: tuple[str, ...] = ()           # regular expressions of HF tensors that carry no weights


def _dense_llama(model_type: str, architecture: str, *, bias=None, qk_norm=None, window=False) -> Family:
    def to_model(config):
        _silu(config)
        model = llama_model(config, bias=bias, qk_norm=qk_norm, window=window)
        model["block"]["mlp"] = swiglu_mlp(_get(config, "intermediate_size"), bool(config.get("mlp_bias", False)))
        return model

    def to_config(spec):
        m, a = spec.block.mlp, spec.block.attention
        if m.kind != "swiglu" or spec.overrides:
            raise HFError(f"the {model_type} family has a swiglu MLP in every layer")
        config = llama_config(spec, model_type, architecture)
        config.update(intermediate_size=m.hidden, mlp_bias=m.bias)
        if bias is None:
            config["attention_bias"] = bool(a.biased)
        if window:
            config["sliding_window"] = a.window
        return config

    return Family(model_type, architecture, to_model, to_config, llama_rules)


def _mixtral_model(config):
    _silu(config)
    model = llama_model(config, window=True)
    model["block"]["mlp"] = moe_mlp(config, _get(config, "num_local_experts"), _get(config, "num_experts_per_tok"),
                                    _get(config, "intermediate_size"), renormalize=True)
    return model


def _moe_config(spec, model_type, architecture, experts_key):
    m = spec.block.mlp
    if m.kind != "moe":
        raise HFError(f"the {model_type} family is a mixture of experts")
    config = llama_config(spec, model_type, architecture)
    config.update({experts_key: m.n_experts, "num_experts_per_tok": m.top_k, "intermediate_size": m.hidden,
                   "router_aux_loss_coef": m.lb_loss_coef, "output_router_logits": False})
    return config


def _mixtral_config(spec):
    if spec.overrides:
        raise HFError("the mixtral family has an MoE in every layer")
    config = _moe_config(spec, "mixtral", "MixtralForCausalLM", "num_local_experts")
    config["sliding_window"] = spec.block.attention.window
    return config


def _n_experts(config: dict) -> int:
    """``num_experts`` (transformers 4.x files) or ``num_local_experts`` (what 5.x writes)."""
    return int(config["num_experts"] if config.get("num_experts") is not None
               else _get(config, "num_local_experts"))


def _qwen3_moe_sparse(config: dict, i: int) -> bool:
    step = int(config.get("decoder_sparse_step", 1))
    return (i not in (config.get("mlp_only_layers") or ())) and _n_experts(config) > 0 \
        and (i + 1) % step == 0


def _qwen3_moe_model(config):
    _silu(config)
    model = llama_model(config, qk_norm="head")
    model["block"]["mlp"] = moe_mlp(config, _n_experts(config), _get(config, "num_experts_per_tok"),
                                    _get(config, "moe_intermediate_size"), bool(config.get("norm_topk_prob", False)))
    dense = [i for i in range(model["n_layers"]) if not _qwen3_moe_sparse(config, i)]
    if dense:
        model["overrides"] = [{"layers": dense, "mlp": swiglu_mlp(_get(config, "intermediate_size"))}]
    return model


def _qwen3_moe_config(spec):
    m = spec.block.mlp
    config = _moe_config(spec, "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts")
    dense = [i for i, b in enumerate(spec.blocks) if b.mlp.kind != "moe"]
    hidden = {spec.blocks[i].mlp.hidden for i in dense if spec.blocks[i].mlp.kind == "swiglu"}
    config.update(moe_intermediate_size=m.hidden, intermediate_size=hidden.pop() if len(hidden) == 1 else m.hidden,
                  norm_topk_prob=m.router.renormalize, decoder_sparse_step=1, mlp_only_layers=dense,
                  attention_bias=bool(spec.block.attention.biased))
    return config


def _olmoe_model(config):
    _silu(config)
    model = llama_model(config, qk_norm="projection")
    model["block"]["mlp"] = moe_mlp(config, _n_experts(config), _get(config, "num_experts_per_tok"),
                                    _get(config, "intermediate_size"), bool(config.get("norm_topk_prob", False)))
    return model


def _olmoe_config(spec):
    if spec.overrides:
        raise HFError("the olmoe family has an MoE in every layer")
    config = _moe_config(spec, "olmoe", "OlmoeForCausalLM", "num_experts")
    config.update(norm_topk_prob=spec.block.mlp.router.renormalize, attention_bias=bool(spec.block.attention.biased),
                  router_z_loss_coef=spec.block.mlp.z_loss_coef, clip_qkv=None)
    return config


# ---- GPT-2
def _gpt2_model(config):
    _check_common(config)
    act = config.get("activation_function", "gelu_new")
    approximate = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approximate is None:
        raise HFError(f"config.json: activation_function '{act}' is not implemented (gelu_new, gelu)")
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                     ("add_cross_attention", True)):
        if config.get(key, not bad) == bad:
            raise HFError(f"config.json: {key} {bad} is not implemented")
    d = int(_get(config, "n_embd"))
    norm = {"kind": "layernorm", "eps": float(config.get("layer_norm_epsilon", 1e-5))}
    return {"vocab_size": int(_get(config, "vocab_size")), "pad_vocab_to": 1,
            "context_length": int(_get(config, "n_positions")), "d_model": d, "n_layers": int(_get(config, "n_layer")),
            "tie_embeddings": True, "positional": {"kind": "learned"},
            "block": {"norm": norm, "attention": {"kind": "causal", "n_heads": int(_get(config, "n_head")), "bias": True},
                      "mlp": {"kind": "gelu", "hidden_size": int(config.get("n_inner") or 4 * d), "bias": True,
                              "approximate": approximate}}}


def _gpt2_config(spec):
    b = spec.block
    if spec.positional.kind != "learned" or b.norm.kind != "layernorm" or b.mlp.kind != "gelu" or spec.overrides:
        raise HFError("the gpt2 family needs learned positions, layernorm and a gelu MLP in every layer")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": spec.vocab_size,
            "n_positions": spec.context_length, "n_embd": spec.d_model, "n_layer": spec.n_layers,
            "n_head": b.attention.n_heads, "n_inner": b.mlp.hidden, "layer_norm_epsilon": b.norm.eps,
            "activation_function": {"tanh": "gelu_new", "none": "gelu"}[b.mlp.approximate],
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "scale_attn_weights": True, "dtype": "float32"}


def _gpt2_rules(spec, names: set[str]) -> list[Rule]:
    t = "transformer." if any(n.startswith("transformer.") for n in names) or not names else ""
    rules = [same("wte.weight", t + "wte.weight"), same("pos.wpe.weight", t + "wpe.weight"),
             same("norm.weight", t + "ln_f.weight"), same("norm.bias", t + "ln_f.bias")]
    for i in range(spec.n_layers):
        ours, hf = f"blocks.{i}.", f"{t}h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            rules += [same(f"{ours}{a}.weight", f"{hf}{b}.weight"), same(f"{ours}{a}.bias", f"{hf}{b}.bias")]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                     ("mlp.down", "mlp.c_proj")):
            rules += [transposed(f"{ours}{a}.weight", f"{hf}{b}.weight"), same(f"{ours}{a}.bias", f"{hf}{b}.bias")]
    return rules


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _dense_llama("llama", "LlamaForCausalLM"),
    _dense_llama("mistral", "MistralForCausalLM", window=True),
    _dense_llama("qwen2", "Qwen2ForCausalLM", bias=["q", "k", "v"]),
    _dense_llama("qwen3", "Qwen3ForCausalLM", qk_norm="head"),
    Family("gpt2", "GPT2LMHeadModel", _gpt2_model, _gpt2_config, _gpt2_rules,
           ignored=(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",)),
    Family("mixtral", "MixtralForCausalLM", _mixtral_model, _mixtral_config,
           lambda spec, names: llama_rules(spec, names, "block_sparse_moe.", ("w1", "w3", "w2"))),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_model, _qwen3_moe_config, llama_rules),
    Family("olmoe", "OlmoeForCausalLM", _olmoe_model, _olmoe_config, llama_rules),
)}

#: our ``model:`` keys that change training but not the function the model computes (ignored when export
#: compares a model with the one its config.json describes)
TRAINING_ONLY = {"dropout", "init", "lb_loss_coef", "z_loss_coef", "lb_loss_type", "dispatch", "jitter",
                 "min_capacity", "drop_policy", "multiple_of", "hidden_mult", "expert_hidden_mult"}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise HFError(f"config.json: model_type '{model_type}' is not supported (supported: "
                      f"{', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]

