"""The Hugging Face model families we convert exactly, one :class:`Family` each.

A family knows three things:

``to_model(config)``   a ``config.json`` mapping -> our ``model:`` section (a plain dict, validated later
                       like any blueprint); anything we do not implement is an :class:`HFError` naming it;
                       a key config.json leaves out is transformers' default for the family (``defaults``);
``to_config(spec)``    our built ModelSpec -> the ``config.json`` transformers writes for that family;
``rules(spec, names)`` the tensor mapping table (``rules.py``), one rule per tensor of our state dict;
                       ``names`` (the tensors in the files) picks between equivalent on-disk layouts.

Export picks the family whose ``to_model(to_config(spec))`` gives back exactly ``spec`` (``convert.py``),
so the two directions cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..components.positional import yarn_mscale
from .rules import (HFError, Rule, concat, experts_down, experts_up, fused_experts, interleaved, permuted, same,
                    reordered, shared_experts_down, shared_experts_up, shifted, transposed)



HEAD = "lm_head.weight"         # every family's untied output head


def _get(config: dict, key: str, default: Any = ...):
    if key in config and config[key] is not None:
        return config[key]
    if default is ...:
        raise HFError(f"config.json has no '{key}', which a {config.get('model_type')} model needs")
    return default


# ------------------------------------------------------------------------------------------ pieces
def rope_section(config: dict, *, softmax_mscale: bool = False) -> dict:
    """Our ``positional:`` for a config's RoPE (transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling``; where both are there, ``rope_scaling`` wins, as in transformers' ``convert_rope_params_to_dict``;
    ``config`` has its family's defaults filled in, the top-level ``rope_theta`` among them).  ``softmax_mscale``: the
    family's attention multiplies its softmax scale by YaRN's ``mscale_all_dim`` temperature (DeepSeek-V2/V3);
    elsewhere transformers uses that key only for cos and sin."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:
        raise HFError(f"config.json: rope_parameters per layer type ({', '.join(nested)}) are not implemented "
                      "(one RoPE for every layer)")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"kind": "rope", "theta": float(theta)}
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        out["partial"] = float(partial)
    if rope_type == "default":
        return out
    if rope_type == "llama3":
        if softmax_mscale and params.get("mscale_all_dim"):
            raise HFError("config.json: rope_parameters.mscale_all_dim with rope type llama3 is not implemented "
                          "(our softmax temperature comes with yarn only)")
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
        if missing:
            raise HFError(f"config.json: rope_parameters.{missing[0]} is missing, which rope type llama3 needs")
        out["scaling"] = {"kind": "llama3", "factor": float(params["factor"]),
                          "low_freq_factor": float(params["low_freq_factor"]),
                          "high_freq_factor": float(params["high_freq_factor"]),
                          "original_max_position_embeddings": _original_context(config, params)}
        return out
    if rope_type == "yarn":
        out["scaling"] = _yarn_section(config, params, softmax_mscale)
        return out
    if rope_type == "linear":
        if params.get("factor") is None:
            raise HFError("config.json: rope_parameters.factor is missing, which rope type linear needs")
        out["scaling"] = {"kind": "linear", "factor": float(params["factor"])}
        return out
    raise HFError(f"config.json: rope type '{rope_type}' is not implemented (we convert default, linear, llama3 and "
                  "yarn); "
                  "the model would not be the same")


def _original_context(config: dict, params: dict) -> int:
    """The pre-scaling context length as transformers reads it: a top-level ``original_max_position_embeddings``
    (Phi-3 style) first, then the RoPE parameters', then ``max_position_embeddings``."""
    old = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    return int(old if old is not None else _get(config, "max_position_embeddings"))


def _yarn_section(config: dict, params: dict, softmax_mscale: bool) -> dict:
    """Our ``yarn`` scaling for transformers' yarn ``rope_parameters`` (the same defaults, the same formulas)."""
    old = _original_context(config, params)
    factor = params.get("factor")
    if factor is None:                          # transformers: the ratio of the two context lengths
        factor = int(_get(config, "max_position_embeddings")) / int(old)
    for key in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        value = factor if key == "factor" else params.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value < 0
                                  or (value == 0 and key in ("factor", "attention_factor"))):
            raise HFError(f"config.json: rope_parameters.{key} {value!r} is not implemented (yarn needs a positive "
                          "number)")
    out: dict[str, Any] = {"kind": "yarn", "factor": float(factor), "original_max_position_embeddings": int(old),
                           "beta_fast": float(params.get("beta_fast") or 32.0),    # 0 or null: the default, as
                           "beta_slow": float(params.get("beta_slow") or 1.0),     # transformers does
                           "truncate": bool(params.get("truncate", True))}
    attention, mscale, mscale_all_dim = (params.get(k) for k in ("attention_factor", "mscale", "mscale_all_dim"))
    if attention is not None:
        out["attention_factor"] = float(attention)
    if softmax_mscale or not mscale_all_dim:
        if mscale:
            out["mscale"] = float(mscale)
        if mscale_all_dim:
            out["mscale_all_dim"] = float(mscale_all_dim)
    elif attention is None and mscale:
        # this family scales only cos and sin: the ratio of the two temperatures, written out
        out["attention_factor"] = yarn_mscale(float(factor), float(mscale)) / yarn_mscale(float(factor),
                                                                                          float(mscale_all_dim))
    return out


def rope_config(positional, *, softmax_mscale: bool = False) -> dict:
    """The inverse of :func:`rope_section`, in transformers 5's ``rope_parameters`` (and 4.x's keys)."""
    if positional.kind != "rope":
        raise HFError(f"positional kind '{positional.kind}' has no Hugging Face llama-family equivalent")
    params: dict[str, Any] = {"rope_theta": positional.theta, "rope_type": "default"}
    s = positional.scaling
    if s is not None and s.kind == "llama3":
        params.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                      high_freq_factor=s.high_freq_factor,
                      original_max_position_embeddings=s.original_max_position_embeddings)
    elif s is not None and s.kind == "linear":
        params.update(rope_type="linear", factor=s.factor)
    elif s is not None and s.kind == "yarn":
        if s.mscale_all_dim and not softmax_mscale:
            raise HFError("rope scaling yarn with mscale_all_dim (a softmax temperature) is exported only by "
                          "families whose attention applies it (deepseek_v3)")
        params.update(rope_type="yarn", factor=s.factor,
                      original_max_position_embeddings=s.original_max_position_embeddings,
                      beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        for key, value in (("attention_factor", s.attention_factor_), ("mscale", s.mscale),
                           ("mscale_all_dim", s.mscale_all_dim)):
            if value is not None:
                params[key] = value
    elif s is not None:
        raise HFError(f"rope scaling '{s.kind}' is not exported (we export linear, llama3 and yarn)")
    out = {"rope_parameters": params, "rope_theta": positional.theta}
    if positional.partial != 1.0:
        out["partial_rotary_factor"] = positional.partial
        params["partial_rotary_factor"] = positional.partial
    return out


def _check_common(config: dict, layer_types: tuple[str, ...] = ("full_attention",)) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise HFError(f"config.json has a quantization_config (quant_method '{method}'): quantized checkpoints "
                      "are not converted; use the unquantized (float) weights")
    for t in config.get("layer_types") or ():
        if t not in layer_types:
            raise HFError(f"config.json: layer type '{t}' is not implemented for {config.get('model_type')} "
                          f"(only {', '.join(layer_types)})")


def _silu(config: dict) -> None:
    act = config["hidden_act"]
    if act != "silu":
        raise HFError(f"config.json: hidden_act '{act}' is not implemented for this family (silu only)")


def decoder_section(config: dict, positional: dict, attention: dict) -> dict:
    """The ``model:`` section of a pre-norm RMSNorm decoder (callers add the MLP)."""
    return {"vocab_size": int(_get(config, "vocab_size")), "pad_vocab_to": 1,
            "context_length": int(_get(config, "max_position_embeddings")), "d_model": int(_get(config, "hidden_size")),
            "n_layers": int(_get(config, "num_hidden_layers")),
            "tie_embeddings": bool(config["tie_word_embeddings"]), "positional": positional,
            "block": {"norm": {"kind": "rmsnorm", "eps": float(_get(config, "rms_norm_eps"))}, "attention": attention}}


def llama_model(config: dict, *, bias, qk_norm: str | None = None, windows: list[int | None] | None = None,
                layer_types: tuple[str, ...] = ("full_attention",)) -> dict:
    """The ``model:`` section shared by the llama-shaped families (everything but the MLP).  ``bias``: the
    attention's ``bias`` (the family reads ``attention_bias`` or has a fixed one); ``windows``: each layer's sliding
    window (None: full attention), as the family computes them from config.json."""
    _check_common(config, layer_types)
    d, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    attn: dict[str, Any] = {"kind": "causal", "n_heads": heads,
                            "n_kv_heads": int(_get(config, "num_key_value_heads", heads))}
    head_dim = config.get("head_dim")
    if head_dim and head_dim != d // heads:
        attn["head_dim"] = int(head_dim)
    if bias:
        attn["bias"] = bias
    if qk_norm:
        attn.update(qk_norm=True, qk_norm_scope=qk_norm, qk_norm_eps=float(_get(config, "rms_norm_eps")))
    model = decoder_section(config, rope_section(config), attn)
    if windows is not None:
        _windowed(model, windows)
    return model


def _windowed(model: dict, windows: list[int | None]) -> None:
    """Give layer i of ``model`` the sliding window ``windows[i]`` (None: full attention): layer 0's in ``block``,
    the layers that differ from it as one override (a family has one sliding window)."""
    if len(windows) != model["n_layers"]:
        raise HFError(f"config.json: layer_types has {len(windows)} entries for num_hidden_layers {model['n_layers']}")
    full = model["block"]["attention"]

    def attention(window):
        return full if window is None else dict(full, window=int(window))
    model["block"]["attention"] = attention(windows[0])
    rest = [i for i, w in enumerate(windows) if w != windows[0]]
    if rest:
        model["overrides"] = [*(model.get("overrides") or ()),
                              {"layers": rest, "attention": attention(windows[rest[0]])}]


SLIDING_LAYERS = ("full_attention", "sliding_attention")


def layer_windows(config: dict, types: list[str]) -> list[int | None]:
    """Each layer's window for ``types`` (``full_attention`` / ``sliding_attention``): ``sliding_window`` for the
    sliding layers, which transformers cannot run without one."""
    window = config.get("sliding_window")
    if window is None and "sliding_attention" in types:
        raise HFError("config.json: layer_types has sliding_attention layers but no sliding_window (null, or "
                      "use_sliding_window false); transformers cannot run that model either")
    return [window if t == "sliding_attention" else None for t in types]


def windows_config(spec, model_type: str) -> tuple[int | None, list[str]]:
    """The one sliding window of ``spec``'s layers (None: none) and the ``layer_types`` that place it."""
    windows = [b.attention.window for b in spec.blocks]
    sizes = set(windows) - {None}
    if len(sizes) > 1:
        raise HFError(f"the {model_type} family has one sliding window for its local layers (here {sorted(sizes)})")
    return (sizes.pop() if sizes else None), ["full_attention" if w is None else "sliding_attention" for w in windows]


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
            "lb_loss_coef": float(config["router_aux_loss_coef"]),          # training only: what they trained with
            "z_loss_coef": float(config.get("router_z_loss_coef") or 0.0)}  # (no field of transformers 5's configs)


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
    if a.qk_norm and a.qk_norm_weight:
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


def base_rules(spec) -> list[Rule]:
    """Embedding, final norm and (untied) head of a llama-shaped checkpoint."""
    rules = [same("wte.weight", "model.embed_tokens.weight"), same("norm.weight", "model.norm.weight")]
    if not spec.tie_embeddings:
        rules.append(same("head.weight", HEAD))
    return rules


def llama_rules(spec, names: set[str], config: dict | None = None, moe_prefix: str = "mlp.",
                expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    rules = base_rules(spec)
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
    section: Callable[[dict], dict]         # config.json, its defaults filled in -> our model: section
    to_config: Callable[[Any], dict]
    rules: Callable[..., list[Rule]]        # (spec, names in the files, config.json or None) -> rules
    #: transformers' value (its config class's default) of each config.json key the family reads, for a
    #: config.json that leaves the key out; ``tests/hf/test_hf_config_keys.py`` checks them against transformers
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: config.json key -> the key it stands for (transformers' ``attribute_map``)
    aliases: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()           # regular expressions of HF tensors that carry no weights
    #: config.json -> regular expressions of checkpoint tensors outside the causal LM (DeepSeek's
    #: multi-token-prediction layers, which transformers does not load either)
    skipped: Callable[[dict], tuple[str, ...]] = lambda config: ()
    head: str = HEAD                        # the untied output head (tied: absent, or equal to the embedding)

    def with_defaults(self, config: dict) -> dict:
        """``config`` as transformers reads it: an alias stands for its key, an absent key is transformers'
        default (a key that is there, null included, stays as it is)."""
        out = dict(config)
        for alias, key in self.aliases.items():
            if alias in out and key not in out:
                out[key] = out.pop(alias)
        for key, value in self.defaults.items():
            out.setdefault(key, value)
        return out

    def to_model(self, config: dict) -> dict:
        """config.json -> our ``model:`` section (an HFError for what we do not implement)."""
        return self.section(self.with_defaults(config))


#: The defaults of transformers 5's config classes for the keys we read (``LlamaConfig`` and its relatives);
#: ``rope_theta`` is the class's ``default_theta``.  Keys a family's transformers model ignores are not read
#: (and not listed): Mistral's and Mixtral's attention_bias, Mistral's and the Qwens' mlp_bias, Llama's
#: pretraining_tp (transformers 5 no longer splits the projections) and sliding_window.
_LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
          "attention_bias": False, "mlp_bias": False}
_MISTRAL = {**{k: v for k, v in _LLAMA.items() if k not in ("attention_bias", "mlp_bias")},
            "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "sliding_window": 4096}
_QWEN2 = {**{k: v for k, v in _LLAMA.items() if k not in ("attention_bias", "mlp_bias", "head_dim")},
          "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32, "max_position_embeddings": 32768,
          "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None}
_QWEN3 = {**_QWEN2, "head_dim": 128, "attention_bias": False}


def _qwen_windows(config: dict) -> list[int | None]:
    """Qwen2/Qwen3: ``sliding_window`` counts only with ``use_sliding_window``; without ``layer_types`` the layers
    from ``max_window_layers`` on slide (``Qwen2Config.__post_init__``)."""
    if not config["use_sliding_window"]:
        config = {**config, "sliding_window": None}
    types = config["layer_types"]
    if types is None:
        window, first = config["sliding_window"], int(config["max_window_layers"])
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(int(_get(config, "num_hidden_layers")))]
    return layer_windows(config, list(types))


def _dense_llama(model_type: str, architecture: str, defaults: dict, *, bias=None, mlp_bias: bool = False,
                 qk_norm=None, window: str | None = None) -> Family:
    """``bias`` None: the attention reads ``attention_bias`` (all four projections), else fixed; ``mlp_bias``: the
    MLP reads ``mlp_bias``; ``window``: ``"all"`` (``sliding_window`` in every layer) or ``"layers"`` (Qwen's
    ``layer_types``)."""
    def to_model(config):
        _silu(config)
        windows = None
        if window == "all":
            windows = [config["sliding_window"]] * int(_get(config, "num_hidden_layers"))
        elif window == "layers":
            windows = _qwen_windows(config)
        model = llama_model(config, bias=config["attention_bias"] if bias is None else bias, qk_norm=qk_norm,
                            windows=windows, layer_types=SLIDING_LAYERS if window == "layers" else ("full_attention",))
        model["block"]["mlp"] = swiglu_mlp(_get(config, "intermediate_size"), bool(mlp_bias and config["mlp_bias"]))
        return model

    def to_config(spec):
        m, a = spec.block.mlp, spec.block.attention
        if m.kind != "swiglu" or any(b.mlp != m for b in spec.blocks):
            raise HFError(f"the {model_type} family has one swiglu MLP in every layer")
        config = llama_config(spec, model_type, architecture)
        config["intermediate_size"] = m.hidden
        if mlp_bias:
            config["mlp_bias"] = m.bias
        if bias is None:
            config["attention_bias"] = bool(a.biased)
        if window == "all":
            config["sliding_window"] = a.window
        elif window == "layers":
            size, types = windows_config(spec, model_type)
            sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
            config.update(use_sliding_window=size is not None, sliding_window=size, layer_types=types,
                          max_window_layers=sliding[0] if sliding else spec.n_layers)
        return config

    return Family(model_type, architecture, to_model, to_config, llama_rules, defaults)


_MIXTRAL = {**_MISTRAL, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
            "num_experts_per_tok": 2, "num_local_experts": 8, "router_aux_loss_coef": 0.001}


def _mixtral_model(config):
    _silu(config)
    # attention_bias: MixtralAttention has none, whatever config.json says; router_jitter_noise: training only;
    # the top-k weights are always renormalised (MixtralTopKRouter)
    model = llama_model(config, bias=False, windows=[config["sliding_window"]] * int(_get(config, "num_hidden_layers")))
    model["block"]["mlp"] = moe_mlp(config, _get(config, "num_local_experts"), _get(config, "num_experts_per_tok"),
                                    _get(config, "intermediate_size"), renormalize=True)
    return model


def _moe_config(spec, model_type, architecture, experts_key):
    m = spec.block.mlp
    if m.kind != "moe":
        raise HFError(f"the {model_type} family is a mixture of experts")
    if m.router.kind != "topk":
        raise HFError(f"the {model_type} family routes with a softmax top-k (router kind topk), not "
                      f"{m.router.kind}")
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


_QWEN3_MOE = {**{k: v for k, v in _QWEN3.items() if k not in ("head_dim", "max_window_layers", "layer_types")},
              "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_key_value_heads": 4,
              "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
              "num_local_experts": 128, "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": None}


def _qwen3_moe_sparse(config: dict, i: int) -> bool:
    step = int(config["decoder_sparse_step"])
    return (i not in (config["mlp_only_layers"] or ())) and int(config["num_local_experts"]) > 0 \
        and (i + 1) % step == 0


def _qwen3_moe_model(config):
    _silu(config)
    # one sliding_window for every layer (Qwen3MoeAttention, its causal mask), only with use_sliding_window
    window = config["sliding_window"] if config["use_sliding_window"] else None
    model = llama_model(config, bias=config["attention_bias"], qk_norm="head",
                        windows=[window] * int(_get(config, "num_hidden_layers")))
    model["block"]["mlp"] = moe_mlp(config, _get(config, "num_local_experts"), _get(config, "num_experts_per_tok"),
                                    _get(config, "moe_intermediate_size"), bool(config["norm_topk_prob"]))
    dense = [i for i in range(model["n_layers"]) if not _qwen3_moe_sparse(config, i)]
    if dense:
        model["overrides"] = [*(model.get("overrides") or ()),
                              {"layers": dense, "mlp": swiglu_mlp(_get(config, "intermediate_size"))}]
    return model


def _qwen3_moe_config(spec):
    m = spec.block.mlp
    config = _moe_config(spec, "qwen3_moe", "Qwen3MoeForCausalLM", "num_local_experts")
    dense = [i for i, b in enumerate(spec.blocks) if b.mlp.kind != "moe"]
    hidden = {spec.blocks[i].mlp.hidden for i in dense if spec.blocks[i].mlp.kind == "swiglu"}
    window = spec.block.attention.window
    config.update(moe_intermediate_size=m.hidden, intermediate_size=hidden.pop() if len(hidden) == 1 else m.hidden,
                  norm_topk_prob=m.router.renormalize, decoder_sparse_step=1, mlp_only_layers=dense,
                  attention_bias=bool(spec.block.attention.biased), use_sliding_window=window is not None,
                  sliding_window=window)
    return config


_OLMOE = {**{k: v for k, v in _LLAMA.items() if k not in ("mlp_bias", "head_dim")},
          "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
          "num_attention_heads": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "clip_qkv": None,
          "num_experts_per_tok": 8, "num_experts": 64, "router_aux_loss_coef": 0.01, "norm_topk_prob": False}


def _olmoe_model(config):
    _silu(config)
    if config["clip_qkv"] is not None:
        raise HFError(f"config.json: clip_qkv {config['clip_qkv']} is not implemented")
    # sliding_window (not an OlmoeConfig key) reaches only the flash-attention kernel; the eager and sdpa
    # paths, whose causal mask has no window, ignore it: so do we
    model = llama_model(config, bias=config["attention_bias"], qk_norm="projection")
    model["block"]["mlp"] = moe_mlp(config, _get(config, "num_experts"), _get(config, "num_experts_per_tok"),
                                    _get(config, "intermediate_size"), bool(config["norm_topk_prob"]))
    return model


def _olmoe_config(spec):
    if spec.overrides:
        raise HFError("the olmoe family has an MoE in every layer")
    config = _moe_config(spec, "olmoe", "OlmoeForCausalLM", "num_experts")
    config.update(norm_topk_prob=spec.block.mlp.router.renormalize, attention_bias=bool(spec.block.attention.biased),
                  router_z_loss_coef=spec.block.mlp.z_loss_coef, clip_qkv=None)
    return config


# ---- GPT-OSS
CLAMPED_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}     # what our swiglu_clamped experts compute
_GPT_OSS = {**{k: v for k, v in _MISTRAL.items() if k != "intermediate_size"},
            "num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
            "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "sliding_window": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "num_experts_per_tok": 4, **CLAMPED_SWIGLU,
            "router_aux_loss_coef": 0.001, "layer_types": None, "attention_bias": True,
            # GptOssConfig.__post_init__'s RoPE when config.json has none (rope_theta is default_theta)
            "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096}}


def _gpt_oss_model(config):
    for key, ours in CLAMPED_SWIGLU.items():
        if float(config[key]) != ours:
            raise HFError(f"config.json: {key} {config[key]} is not implemented (our swiglu_clamped experts use "
                          f"{ours})")
    n = int(_get(config, "num_hidden_layers"))
    types = config["layer_types"]
    if types is None:                            # transformers' default: sliding first, then alternating
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    model = llama_model(config, bias=config["attention_bias"], layer_types=SLIDING_LAYERS)
    model["block"]["attention"]["sinks"] = True
    _windowed(model, layer_windows(config, list(types)))
    # hidden_act is not read: the experts' clamped SwiGLU is fixed (GptOssExperts)
    mlp = moe_mlp(config, _get(config, "num_local_experts"), _get(config, "num_experts_per_tok"),
                  _get(config, "intermediate_size"), renormalize=True)
    mlp.update(expert_kind="swiglu_clamped", bias=True, router={"kind": "topk", "renormalize": True, "bias": True},
               z_loss_coef=0.0)
    model["block"]["mlp"] = mlp
    return model


def _gpt_oss_config(spec):
    m = spec.block.mlp
    if m.kind != "moe" or m.expert_kind != "swiglu_clamped" or m.router.kind != "topk":
        raise HFError("the gpt_oss family has an MoE of swiglu_clamped experts with a topk router in every layer")
    window, types = windows_config(spec, "gpt_oss")
    config = llama_config(spec, "gpt_oss", "GptOssForCausalLM")
    config.update({"num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k, "intermediate_size": m.hidden,
                   "router_aux_loss_coef": m.lb_loss_coef, "output_router_logits": False,
                   "attention_bias": bool(spec.block.attention.biased), **CLAMPED_SWIGLU,
                   "layer_types": types, "sliding_window": window})
    return config


def _gpt_oss_rules(spec, names: set[str], config: dict | None = None) -> list[Rule]:
    """One layout: the experts fused as ``save_pretrained`` writes them (``gate_up_proj`` [E, D, 2I] with gate and
    up interleaved, its bias, ``down_proj`` [E, I, D] and its bias); MXFP4 files are refused by config.json."""
    rules = base_rules(spec)
    for i, b in enumerate(spec.blocks):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        m, e = b.mlp, hf + "mlp."
        if m.kind != "moe" or not m.bias or not m.router.bias or not b.attention.sinks:
            raise HFError("every gpt_oss layer has attention sinks and an MoE with biased experts and router")
        rules += [same(ours + "norm1.weight", hf + "input_layernorm.weight"),
                  same(ours + "norm2.weight", hf + "post_attention_layernorm.weight"),
                  *attention_rules(b.attention, ours + "attn.", hf + "self_attn."),
                  same(ours + "attn.sinks", hf + "self_attn.sinks"),
                  same(ours + "mlp.router.weight", e + "router.weight"),
                  same(ours + "mlp.router.bias", e + "router.bias"),
                  interleaved(ours + "mlp.experts.up", e + "experts.gate_up_proj"),
                  interleaved(ours + "mlp.experts.up_bias", e + "experts.gate_up_proj_bias"),
                  same(ours + "mlp.experts.down", e + "experts.down_proj"),
                  same(ours + "mlp.experts.down_bias", e + "experts.down_proj_bias")]
    return rules


# ---- DeepSeek-V3
_DEEPSEEK = {**{k: v for k, v in _LLAMA.items() if k not in ("mlp_bias", "head_dim")},
             "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
             "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
             "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
             "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
             "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
             "max_position_embeddings": 4096, "rope_interleave": True, "num_nextn_predict_layers": 1}


def _deepseek_model(config):
    _check_common(config)
    _silu(config)
    heads = int(_get(config, "num_attention_heads"))
    if int(config.get("num_key_value_heads") or heads) != heads:
        raise HFError(f"config.json: num_key_value_heads {config['num_key_value_heads']} differs from "
                      f"num_attention_heads {heads}; multi-head latent attention has one key/value per head")
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):   # DeepSeek's own keys: transformers
        if config.get(key, want) != want:                                            # computes these, whatever they say
            raise HFError(f"config.json: {key} '{config[key]}' is not implemented (transformers and we compute "
                          f"'{want}')")
    q_lora = config.get("q_lora_rank")
    attn = {"kind": "mla", "n_heads": heads, "q_lora_rank": int(q_lora) if q_lora is not None else None,
            "kv_lora_rank": int(_get(config, "kv_lora_rank")),
            "qk_nope_head_dim": int(_get(config, "qk_nope_head_dim")),
            "qk_rope_head_dim": int(_get(config, "qk_rope_head_dim")), "v_head_dim": int(_get(config, "v_head_dim")),
            "bias": bool(config["attention_bias"]),
            "latent_norm_eps": 1e-6}                 # transformers' q_a/kv_a_layernorm keep their default eps
    model = decoder_section(config, rope_section(config, softmax_mscale=True), attn)
    top_k, shared = int(_get(config, "num_experts_per_tok")), int(config["n_shared_experts"] or 0)
    if not config["norm_topk_prob"]:
        raise HFError("config.json: norm_topk_prob false is not implemented (our sigmoid router always "
                      "normalises the top-k weights)")
    if top_k == 1:
        raise HFError("config.json: num_experts_per_tok 1 is not implemented (transformers then weighs the expert "
                      "by 1, our sigmoid router by its raw affinity)")
    if shared < 1:
        raise HFError("config.json: n_shared_experts 0 is not implemented for deepseek_v3 (transformers still "
                      "builds an empty shared MLP)")
    n_group = int(config.get("n_group") or 1)
    model["block"]["mlp"] = {
        "kind": "moe", "n_experts": int(_get(config, "n_routed_experts")), "top_k": top_k, "expert_kind": "swiglu",
        "expert_hidden": int(_get(config, "moe_intermediate_size")), "n_shared_experts": shared,
        "lb_loss_type": "sequence", "lb_loss_coef": float(config.get("aux_loss_alpha", 0.0001)), "z_loss_coef": 0.0,
        "router": {"kind": "sigmoid", "routed_scaling_factor": float(_get(config, "routed_scaling_factor")),
                   "n_group": n_group, "topk_group": int(config.get("topk_group") or 1) if n_group > 1 else 1}}
    dense = min(int(config["first_k_dense_replace"] or 0), model["n_layers"])
    if dense:
        model["overrides"] = [{"layers": list(range(dense)), "mlp": swiglu_mlp(_get(config, "intermediate_size"))}]
    return model


def _mtp_layers(spec) -> int:
    """DeepSeek-V3's num_nextn_predict_layers: the depth of MTP modules of the last layer's block (as DeepSeek's
    are; transformers' model has none of them: their weights are not exported), else 0."""
    return spec.mtp.depth if spec.mtp is not None and spec.mtp.block is None else 0


def _deepseek_config(spec):
    a, m, norm = spec.block.attention, spec.block.mlp, spec.block.norm
    if a.kind != "mla" or norm.kind != "rmsnorm" or m.kind != "moe" or m.router.kind != "sigmoid":
        raise HFError("the deepseek_v3 family needs mla attention, rmsnorm and an MoE with a sigmoid router")
    dense = 0
    while dense < spec.n_layers and spec.blocks[dense].mlp.kind == "swiglu":
        dense += 1
    r = m.router
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_heads, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
            "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim, "attention_bias": a.bias,
            "rope_interleave": True, "intermediate_size": spec.blocks[0].mlp.hidden if dense else m.hidden,
            "moe_intermediate_size": m.hidden, "n_routed_experts": m.n_experts, "num_experts_per_tok": m.top_k,
            "n_shared_experts": m.n_shared_experts, "routed_scaling_factor": r.routed_scaling_factor,
            "n_group": r.n_group, "topk_group": r.topk_group, "norm_topk_prob": True,
            "first_k_dense_replace": dense, "num_nextn_predict_layers": _mtp_layers(spec), "hidden_act": "silu",
            "max_position_embeddings": spec.context_length, "rms_norm_eps": norm.eps,
            "tie_word_embeddings": spec.tie_embeddings, "attention_dropout": 0.0, "dtype": "float32",
            **rope_config(spec.positional, softmax_mscale=True)}


def _rope_rows(rows: int, per_head: int, nope: int) -> torch.Tensor:
    """``ours[j] = hf[index[j]]`` for ``rows`` rows in blocks of ``per_head``: in each block the first ``nope`` rows
    stay, the rotary rows after them go from DeepSeek's interleaved pairs (x0, x1), (x2, x3) ... to our halves
    (x0, x2, ..., x1, x3, ...), which is what transformers' interleaved RoPE computes."""
    rope = per_head - nope
    within = torch.cat([torch.arange(nope), nope + torch.arange(0, rope, 2), nope + torch.arange(1, rope, 2)])
    return (torch.arange(0, rows, per_head)[:, None] + within[None, :]).reshape(-1)


def _mla_rules(a, ours: str, hf: str, interleave: bool) -> list[Rule]:
    H, N, R, C = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank

    def rope_rows(our_name, hf_name, rows, per_head, nope):
        if not interleave:
            return same(our_name, hf_name)
        return permuted(our_name, hf_name, _rope_rows(rows, per_head, nope))

    rules = []
    if a.q_lora_rank:
        rules += [same(ours + "q_down.weight", hf + "q_a_proj.weight"),
                  same(ours + "q_norm.weight", hf + "q_a_layernorm.weight"),
                  rope_rows(ours + "q_up.weight", hf + "q_b_proj.weight", H * (N + R), N + R, N)]
        if a.bias:
            rules.append(same(ours + "q_down.bias", hf + "q_a_proj.bias"))
    else:
        rules.append(rope_rows(ours + "q_proj.weight", hf + "q_proj.weight", H * (N + R), N + R, N))
    rules += [rope_rows(ours + "kv_down.weight", hf + "kv_a_proj_with_mqa.weight", C + R, C + R, C),
              same(ours + "kv_norm.weight", hf + "kv_a_layernorm.weight"),
              same(ours + "kv_up.weight", hf + "kv_b_proj.weight"),
              same(ours + "out.weight", hf + "o_proj.weight")]
    if a.bias:
        rules += [rope_rows(ours + "kv_down.bias", hf + "kv_a_proj_with_mqa.bias", C + R, C + R, C),
                  same(ours + "out.bias", hf + "o_proj.bias")]
    return rules


def _deepseek_rules(spec, names: set[str], config: dict | None = None) -> list[Rule]:
    """Routed experts per expert (``experts.N.{gate,up,down}_proj``, what ``save_pretrained`` writes) or fused
    (transformers 5's in-memory ``gate_up_proj`` / ``down_proj``); the shared experts as one wide MLP."""
    interleave = bool((config or {}).get("rope_interleave", True))
    rules = base_rules(spec)
    for i, b in enumerate(spec.blocks):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        m = b.mlp
        rules += [same(ours + "norm1.weight", hf + "input_layernorm.weight"),
                  same(ours + "norm2.weight", hf + "post_attention_layernorm.weight"),
                  *_mla_rules(b.attention, ours + "attn.", hf + "self_attn.", interleave)]
        if m.kind == "swiglu" and not m.bias:
            rules += mlp_rules(m, ours + "mlp.", hf, names, "mlp.", ("gate_proj", "up_proj", "down_proj"))
            continue
        if m.kind != "moe" or m.expert_kind != "swiglu" or m.bias or m.router.kind != "sigmoid" \
                or not m.n_shared_experts:
            raise HFError("every deepseek_v3 layer is a swiglu MLP or an MoE of swiglu experts with shared experts "
                          "and a sigmoid router")
        e, o = hf + "mlp.", ours + "mlp."
        rules += [same(o + "router.weight", e + "gate.weight"),
                  same(o + "router.expert_bias", e + "gate.e_score_correction_bias"),
                  shared_experts_up(o + "shared.up", e + "shared_experts.gate_proj.weight",
                                    e + "shared_experts.up_proj.weight", m.n_shared_experts),
                  shared_experts_down(o + "shared.down", e + "shared_experts.down_proj.weight", m.n_shared_experts)]
        if e + "experts.gate_up_proj" in names:
            rules += [fused_experts(o + "experts.up", e + "experts.gate_up_proj"),
                      fused_experts(o + "experts.down", e + "experts.down_proj")]
        else:
            n = range(m.n_experts)
            rules += [experts_up(o + "experts.up", [f"{e}experts.{j}.gate_proj.weight" for j in n],
                                 [f"{e}experts.{j}.up_proj.weight" for j in n]),
                      experts_down(o + "experts.down", [f"{e}experts.{j}.down_proj.weight" for j in n])]
    return rules


def _deepseek_skipped(config: dict) -> tuple[str, ...]:
    """DeepSeek's multi-token-prediction layers follow the last layer (``model.layers.61`` of DeepSeek-V3)."""
    n = int(config.get("num_hidden_layers") or 0)
    extra = int(config.get("num_nextn_predict_layers") or 0)
    return tuple(rf"^model\.layers\.{n + j}\." for j in range(extra))


# ---- GPT-2
_GPT2 = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
         "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
         "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True}
#: reorder_and_upcast_attn only computes the scores in fp32 (the same function): not read


def _gpt2_model(config):
    _check_common(config)
    act = config["activation_function"]
    approximate = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approximate is None:
        raise HFError(f"config.json: activation_function '{act}' is not implemented (gelu_new, gelu)")
    for key, bad, why in (("scale_attn_by_inverse_layer_idx", True, "scores scaled by 1/(layer + 1)"),
                          ("scale_attn_weights", False, "unscaled attention scores"),
                          ("add_cross_attention", True, "cross-attention layers")):
        if bool(config[key]) == bad:
            raise HFError(f"config.json: {key} {str(bad).lower()} is not implemented ({why})")
    d = int(_get(config, "n_embd"))
    norm = {"kind": "layernorm", "eps": float(_get(config, "layer_norm_epsilon"))}
    return {"vocab_size": int(_get(config, "vocab_size")), "pad_vocab_to": 1,
            "context_length": int(_get(config, "n_positions")), "d_model": d, "n_layers": int(_get(config, "n_layer")),
            "tie_embeddings": bool(config["tie_word_embeddings"]), "positional": {"kind": "learned"},
            "block": {"norm": norm, "attention": {"kind": "causal", "n_heads": int(_get(config, "n_head")), "bias": True},
                      "mlp": {"kind": "gelu", "hidden_size": int(config["n_inner"] or 4 * d), "bias": True,
                              "approximate": approximate}}}


def _gpt2_config(spec):
    b = spec.block
    if spec.positional.kind != "learned" or b.norm.kind != "layernorm" or b.mlp.kind != "gelu" or spec.overrides:
        raise HFError("the gpt2 family needs learned positions, layernorm and a gelu MLP in every layer")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": spec.vocab_size,
            "n_positions": spec.context_length, "n_embd": spec.d_model, "n_layer": spec.n_layers,
            "n_head": b.attention.n_heads, "n_inner": b.mlp.hidden, "layer_norm_epsilon": b.norm.eps,
            "activation_function": {"tanh": "gelu_new", "none": "gelu"}[b.mlp.approximate],
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": spec.tie_embeddings,
            "scale_attn_weights": True, "dtype": "float32"}


def _gpt2_rules(spec, names: set[str], config: dict | None = None) -> list[Rule]:
    """``transformer.``-prefixed names (GPT2LMHeadModel) or bare ones (GPT2Model, e.g. openai-community/gpt2); the
    untied head is ``lm_head.weight`` either way."""
    t = "transformer." if any(n.startswith("transformer.") for n in names) or not names else ""
    rules = [same("wte.weight", t + "wte.weight"), same("pos.wpe.weight", t + "wpe.weight"),
             same("norm.weight", t + "ln_f.weight"), same("norm.bias", t + "ln_f.bias")]
    if not spec.tie_embeddings:
        rules.append(same("head.weight", HEAD))
    for i in range(spec.n_layers):
        ours, hf = f"blocks.{i}.", f"{t}h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            rules += [same(f"{ours}{a}.weight", f"{hf}{b}.weight"), same(f"{ours}{a}.bias", f"{hf}{b}.bias")]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                     ("mlp.down", "mlp.c_proj")):
            rules += [transposed(f"{ours}{a}.weight", f"{hf}{b}.weight"), same(f"{ours}{a}.bias", f"{hf}{b}.bias")]
    return rules


# ---- Gemma 3 (text)
#: Gemma3TextConfig's defaults for the keys we read.  The RoPE keys are read as its ``convert_rope_params_to_dict``
#: does (:func:`_gemma3_ropes`), and 4.x's ``sliding_window_pattern`` where ``layer_types`` is absent (6: every
#: sixth layer global); attention_dropout is training only, and attn_logit_softcapping is not read: Gemma3Attention
#: never passes it to its attention functions (Gemma 3 has no attention soft-cap), so neither do we.
_GEMMA3 = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
           "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
           "sliding_window": 4096, "layer_types": None, "final_logit_softcapping": None,
           "use_bidirectional_attention": False}
#: Gemma3TextConfig.default_theta per layer type, and the 4.x key of each type's theta
_GEMMA3_THETA = {"full_attention": ("rope_theta", 1_000_000.0), "sliding_attention": ("rope_local_base_freq", 10_000.0)}


def _gemma3_ropes(config: dict) -> dict[str, dict]:
    """Our ``positional:`` for each layer type: ``rope_parameters`` by layer type (transformers 5), else 4.x's
    ``rope_theta`` and ``rope_scaling`` for the global (full-attention) layers and ``rope_local_base_freq`` for the
    local (sliding) ones; theta 1e6 and 1e4 where they are absent."""
    given = config.get("rope_parameters") or {}
    flat = sorted(k for k in given if k not in _GEMMA3_THETA)
    if flat:
        raise HFError(f"config.json: gemma3_text's rope_parameters has one entry per layer type (full_attention, "
                      f"sliding_attention), not {', '.join(flat)}")
    out = {}
    for layer_type, (theta_key, theta) in _GEMMA3_THETA.items():
        params = dict(given.get(layer_type) or {"rope_type": "default"})
        if layer_type == "full_attention" and config.get("rope_scaling"):
            params.update(config["rope_scaling"])
        params.setdefault("rope_theta", config.get(theta_key) or theta)
        out[layer_type] = rope_section({**config, "rope_scaling": None, "rope_parameters": params})
    return out


def _gemma3_model(config):
    _check_common(config, SLIDING_LAYERS)
    if config["use_bidirectional_attention"]:
        raise HFError("config.json: use_bidirectional_attention true is not implemented (our decoder attends "
                      "causally)")
    if config["hidden_activation"] != "gelu_pytorch_tanh":
        raise HFError(f"config.json: hidden_activation '{config['hidden_activation']}' is not implemented for "
                      "gemma3_text (gelu_pytorch_tanh: our geglu)")
    n = int(_get(config, "num_hidden_layers"))
    types = config["layer_types"]
    if types is None:
        pattern = int(config.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    types = list(types)
    windows = layer_windows(config, types)
    if len(types) != n:
        raise HFError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers {n}")
    heads, eps = int(_get(config, "num_attention_heads")), float(_get(config, "rms_norm_eps"))
    # Gemma's (1 + weight) norms are ours with weight + 1, and the softmax scale query_pre_attn_scalar ** -0.5 is
    # folded into the query norm's weight (the rules): the attention itself is the plain head_dim ** -0.5 one
    attn: dict[str, Any] = {"kind": "causal", "n_heads": heads, "n_kv_heads": int(_get(config, "num_key_value_heads")),
                            "head_dim": int(_get(config, "head_dim")), "qk_norm": True, "qk_norm_eps": eps}
    if config["attention_bias"]:
        attn["bias"] = True
    ropes = _gemma3_ropes(config)

    def attention(window):
        return attn if window is None else dict(attn, window=int(window))
    model = decoder_section(config, ropes[types[0]], attention(windows[0]))
    model.update(embed_scale=True, norm_placement="sandwich")
    if config["final_logit_softcapping"] is not None:
        model["logit_softcap"] = float(config["final_logit_softcapping"])
    model["block"]["mlp"] = {"kind": "geglu", "hidden_size": int(_get(config, "intermediate_size"))}
    rest = [i for i, t in enumerate(types) if t != types[0]]     # the other type's layers: window and RoPE
    if rest:
        override = {"layers": rest, "attention": attention(windows[rest[0]])}
        if ropes[types[rest[0]]] != ropes[types[0]]:
            override["positional"] = ropes[types[rest[0]]]
        model["overrides"] = [override]
    return model


def _gemma3_config(spec):
    a, norm, m = spec.block.attention, spec.block.norm, spec.block.mlp
    if spec.norm_placement != "sandwich" or not spec.embed_scale or norm.kind != "rmsnorm" or m.kind != "geglu" \
            or a.kind != "causal" or not a.qk_norm:
        raise HFError("the gemma3_text family has sandwich rmsnorms, scaled embeddings, a geglu MLP and causal "
                      "attention with q/k norms")
    window, types = windows_config(spec, "gemma3_text")
    ropes: dict[str, dict] = {}
    for i, (b, t) in enumerate(zip(spec.blocks, types)):
        if b.positional.kind != "rope":
            raise HFError(f"layer {i} has positional kind '{b.positional.kind}'; the gemma3_text family has RoPE in "
                          "every layer")
        ropes.setdefault(t, rope_config(b.positional)["rope_parameters"])
    for t in SLIDING_LAYERS:                  # a type no layer has: the other's RoPE (transformers needs both)
        ropes.setdefault(t, next(iter(ropes.values())))
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": m.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_size,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": spec.context_length,
            "rms_norm_eps": norm.eps, "tie_word_embeddings": spec.tie_embeddings, "attention_bias": bool(a.biased),
            "attention_dropout": 0.0, "query_pre_attn_scalar": a.head_size, "sliding_window": window,
            "layer_types": types, "final_logit_softcapping": spec.logit_softcap,
            "attn_logit_softcapping": None, "use_bidirectional_attention": False,
            "rope_parameters": ropes, "dtype": "float32"}


_GEMMA3_NORMS = (("norm1", "input_layernorm"), ("post_norm1", "post_attention_layernorm"),
                 ("norm2", "pre_feedforward_layernorm"), ("post_norm2", "post_feedforward_layernorm"))


def _gemma3_rules(spec, names: set[str], config: dict | None = None) -> list[Rule]:
    """Every norm weight shifted by one (Gemma's ``1 + weight``); the query norm also carries
    ``sqrt(head_dim / query_pre_attn_scalar)``, the ratio of Gemma's softmax scale to ours."""
    rules = [same("wte.weight", "model.embed_tokens.weight"), shifted("norm.weight", "model.norm.weight")]
    if not spec.tie_embeddings:
        rules.append(same("head.weight", HEAD))
    for i, b in enumerate(spec.blocks):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        a, m = b.attention, b.mlp
        factor = (a.head_size / float(config["query_pre_attn_scalar"])) ** 0.5 if config else 1.0
        rules += [shifted(f"{ours}{x}.weight", f"{hf}{y}.weight") for x, y in _GEMMA3_NORMS]
        rules += [r for r in attention_rules(a, ours + "attn.", hf + "self_attn.") if "_norm." not in r.ours]
        rules += [shifted(ours + "attn.q_norm.weight", hf + "self_attn.q_norm.weight", factor=factor),
                  shifted(ours + "attn.k_norm.weight", hf + "self_attn.k_norm.weight"),
                  concat(ours + "mlp.up.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"],
                         [m.hidden] * 2),
                  same(ours + "mlp.down.weight", hf + "mlp.down_proj.weight")]
    return rules


# ---- Llama 4 (text)
#: Llama4TextConfig's defaults for the keys we read (rope_theta: its default_theta).
_LLAMA4 = {"vocab_size": 202_048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16_384,
           "num_hidden_layers": 48, "num_local_experts": 16, "num_experts_per_tok": 1, "router_aux_loss_coef": 0.001,
           "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
           "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "rope_theta": 500_000.0, "moe_layers": None, "interleave_moe_layer_step": 1, "use_qk_norm": True,
           "no_rope_layers": None, "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None,
           "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False}
CHUNKED_LAYERS = ("full_attention", "chunked_attention")


def _llama4_layers(config: dict) -> tuple[list[int], list[str]]:
    """Each layer's RoPE flag (1: rotates, 0: NoPE) and attention type, as ``Llama4TextConfig.__post_init__``
    derives them where config.json leaves them out."""
    n = int(_get(config, "num_hidden_layers"))
    rope = list(config["no_rope_layers"] or [int((i + 1) % int(config["no_rope_layer_interval"]) != 0)
                                             for i in range(n)])
    chunk = config["attention_chunk_size"]
    types = list(config["layer_types"] or ["chunked_attention" if r and chunk is not None else "full_attention"
                                           for r in rope])
    for key, values in (("no_rope_layers", rope), ("layer_types", types)):
        if len(values) != n:
            raise HFError(f"config.json: {key} has {len(values)} entries for num_hidden_layers {n}")
    if "chunked_attention" in types and chunk is None:
        raise HFError("config.json: layer_types has chunked_attention layers but attention_chunk_size is null; "
                      "transformers cannot run that model either")
    return rope, types


def _llama4_moe_layers(config: dict) -> set[int]:
    """The MoE layers: ``moe_layers``, else every ``interleave_moe_layer_step``-th layer ending each step (layers
    step - 1, 2 * step - 1, ...), as ``Llama4TextConfig.__post_init__`` derives them."""
    n = int(_get(config, "num_hidden_layers"))
    moe = config["moe_layers"]
    if moe is None:
        step = int(config["interleave_moe_layer_step"])
        if step < 1:
            raise HFError(f"config.json: interleave_moe_layer_step {step} must be >= 1 where moe_layers is not given "
                          "(1: every layer is an MoE); or give moe_layers")
        moe = range(step - 1, n, step)
    return {int(i) for i in moe if 0 <= int(i) < n}


def _llama4_moe(config: dict) -> dict:
    """Llama 4's MoE: a sigmoid_topk router whose weights scale the experts' inputs, swiglu experts of
    intermediate_size and one shared expert of the same size."""
    mlp = moe_mlp(config, _get(config, "num_local_experts"), _get(config, "num_experts_per_tok"),
                  _get(config, "intermediate_size"), renormalize=False)
    mlp.update(router={"kind": "sigmoid_topk"}, weight_input=True, n_shared_experts=1)
    return mlp


def _llama4_model(config):
    _silu(config)
    _check_common(config, CHUNKED_LAYERS)
    n = int(_get(config, "num_hidden_layers"))
    moe = _llama4_moe_layers(config)
    rope, types = _llama4_layers(config)
    # attn_temperature_tuning: the NoPE layers' queries are scaled from position floor_scale - 1 on
    tuning = {"query_scale_floor": int(config["floor_scale"]), "query_scale": float(config["attn_scale"])} \
        if config["attn_temperature_tuning"] else {}
    heads, eps = int(_get(config, "num_attention_heads")), float(_get(config, "rms_norm_eps"))
    attn: dict[str, Any] = {"kind": "causal", "n_heads": heads, "n_kv_heads": int(_get(config, "num_key_value_heads")),
                            "head_dim": int(_get(config, "head_dim"))}
    if config["attention_bias"]:
        attn["bias"] = True
    positional = {1: rope_section(config), 0: {"kind": "none"}}

    def attention(rotates: int, layer_type: str) -> dict:   # the L2 (weightless) q/k norm only where RoPE is
        out = dict(attn)
        if rotates and config["use_qk_norm"]:
            out.update(qk_norm=True, qk_norm_weight=False, qk_norm_eps=eps)
        if not rotates:
            out.update(tuning)
        if layer_type == "chunked_attention":
            out["chunk"] = int(config["attention_chunk_size"])
        return out
    model = decoder_section(config, positional[rope[0]], attention(rope[0], types[0]))
    mlps = {False: swiglu_mlp(_get(config, "intermediate_size_mlp")), True: _llama4_moe(config) if moe else None}
    model["block"]["mlp"] = mlps[0 in moe]
    kinds = list(zip(rope, types))
    others = [k for k in dict.fromkeys(kinds) if k != kinds[0]]
    overrides = [{"layers": [i for i, k in enumerate(kinds) if k == kind], "attention": attention(*kind),
                  **({"positional": positional[kind[0]]} if kind[0] != rope[0] else {})} for kind in others]
    other_mlp = [i for i in range(n) if (i in moe) != (0 in moe)]
    if other_mlp:
        overrides.append({"layers": other_mlp, "mlp": mlps[0 not in moe]})
    if overrides:
        model["overrides"] = overrides
    return model


def _is_llama4_moe(m) -> bool:
    """``m`` is an MoE as Llama 4's: swiglu experts without biases, one shared expert, a sigmoid_topk router
    without a bias whose weights scale the experts' inputs."""
    return (m.kind == "moe" and m.expert_kind == "swiglu" and not m.bias and m.n_shared_experts == 1
            and m.weight_input and m.router.kind == "sigmoid_topk" and not m.router.bias)


def _llama4_config(spec):
    a = spec.block.attention
    if a.kind != "causal" or spec.block.norm.kind != "rmsnorm" or \
            not all(b.mlp.kind == "swiglu" or _is_llama4_moe(b.mlp) for b in spec.blocks):
        raise HFError("the llama4_text family has causal attention, rmsnorm and in every layer a swiglu MLP or an "
                      "MoE of swiglu experts with one shared expert, weight_input true and a sigmoid_topk router")
    moe = [i for i, b in enumerate(spec.blocks) if b.mlp.kind == "moe"]
    dense = [b.mlp for b in spec.blocks if b.mlp.kind != "moe"]
    m = spec.blocks[moe[0]].mlp if moe else dense[0]
    rope = [int(b.positional.kind == "rope") for b in spec.blocks]
    for i, b in enumerate(spec.blocks):
        if b.positional.kind not in ("rope", "none"):
            raise HFError(f"layer {i} has positional kind '{b.positional.kind}'; llama4_text layers have RoPE or none")
    rotating = [b.positional for b in spec.blocks if b.positional.kind == "rope"]
    tunings = {(b.attention.query_scale_floor, b.attention.query_scale if b.attention.query_scale_floor else None)
               for b in spec.blocks if b.positional.kind == "none"}
    if any(b.attention.query_scale_floor for b in spec.blocks if b.positional.kind == "rope") or len(tunings) > 1:
        raise HFError("llama4_text scales the queries (query_scale_floor) of every NoPE layer alike and of no RoPE "
                      f"layer (here {sorted(tunings, key=str)} on the NoPE layers)")
    tuning = tunings.pop() if tunings else (None, None)
    chunks = {b.attention.chunk for b in spec.blocks} - {None}
    if len(chunks) > 1:
        raise HFError(f"the llama4_text family has one attention_chunk_size (here {sorted(chunks)})")
    config = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": spec.vocab_size,
              "hidden_size": spec.d_model, "intermediate_size": m.hidden,
              "intermediate_size_mlp": dense[0].hidden if dense else m.hidden,
              "num_hidden_layers": spec.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.kv_heads, "head_dim": a.head_size, "hidden_act": "silu",
              "max_position_embeddings": spec.context_length, "rms_norm_eps": spec.block.norm.eps,
              "tie_word_embeddings": spec.tie_embeddings, "attention_bias": bool(a.biased), "attention_dropout": 0.0,
              "moe_layers": moe, "use_qk_norm": any(b.attention.qk_norm for b in spec.blocks),
              "no_rope_layers": rope, "attention_chunk_size": chunks.pop() if chunks else None,
              "layer_types": ["chunked_attention" if b.attention.chunk else "full_attention" for b in spec.blocks],
              "attn_temperature_tuning": tuning[0] is not None, "floor_scale": tuning[0] or _LLAMA4["floor_scale"],
              "attn_scale": tuning[1] if tuning[0] else 0.1, "dtype": "float32"}
    config.update(rope_config(rotating[0]) if rotating else {"rope_theta": _LLAMA4["rope_theta"]})
    if moe:
        config.update(num_local_experts=m.n_experts, num_experts_per_tok=m.top_k,
                      router_aux_loss_coef=m.lb_loss_coef, output_router_logits=False)
    return config


def _llama4_rules(spec, names: set[str], config: dict | None = None) -> list[Rule]:
    """Llama 4 rotates interleaved pairs (x0, x1), (x2, x3) ... of each q and k head, our RoPE its halves: the q and k
    rows of a rotating layer are reordered (its L2 q/k norm has no weight and does not see the order)."""
    rules = base_rules(spec)
    for i, b in enumerate(spec.blocks):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        a, m = b.attention, b.mlp
        index = None
        if b.positional.kind == "rope":
            q, k = a.widths["q"], a.widths["k"]
            index = torch.cat([_rope_rows(q, a.head_size, 0), q + _rope_rows(k, a.head_size, 0),
                               torch.arange(q + k, q + k + a.widths["v"])])
        rules += [same(ours + "norm1.weight", hf + "input_layernorm.weight"),
                  same(ours + "norm2.weight", hf + "post_attention_layernorm.weight"),
                  *(reordered(r, index) if index is not None and r.ours.startswith(ours + "attn.qkv.") else r
                    for r in attention_rules(a, ours + "attn.", hf + "self_attn."))]
        o, e = ours + "mlp.", hf + "feed_forward."
        if m.kind == "moe":       # experts as ours: gate_up_proj [E, D, 2I] gate | up, down_proj [E, I, D]
            rules += [same(o + "router.weight", e + "router.weight"),
                      same(o + "experts.up", e + "experts.gate_up_proj"),
                      same(o + "experts.down", e + "experts.down_proj"),
                      shared_experts_up(o + "shared.up", e + "shared_expert.gate_proj.weight",
                                        e + "shared_expert.up_proj.weight", 1),
                      shared_experts_down(o + "shared.down", e + "shared_expert.down_proj.weight", 1)]
        else:
            rules += [concat(o + "up.weight", [e + "gate_proj.weight", e + "up_proj.weight"], [m.hidden] * 2),
                      same(o + "down.weight", e + "down_proj.weight")]
    return rules


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _dense_llama("llama", "LlamaForCausalLM", _LLAMA, mlp_bias=True),
    _dense_llama("mistral", "MistralForCausalLM", _MISTRAL, bias=False, window="all"),
    _dense_llama("qwen2", "Qwen2ForCausalLM", _QWEN2, bias=["q", "k", "v"], window="layers"),
    _dense_llama("qwen3", "Qwen3ForCausalLM", _QWEN3, qk_norm="head", window="layers"),
    Family("gpt2", "GPT2LMHeadModel", _gpt2_model, _gpt2_config, _gpt2_rules, _GPT2,
           aliases={"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
                    "num_hidden_layers": "n_layer"},
           ignored=(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",)),
    Family("mixtral", "MixtralForCausalLM", _mixtral_model, _mixtral_config,
           lambda spec, names, config=None: llama_rules(spec, names, config, "block_sparse_moe.", ("w1", "w3", "w2")),
           _MIXTRAL, aliases={"num_experts": "num_local_experts"}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_model, _qwen3_moe_config, llama_rules, _QWEN3_MOE,
           aliases={"num_experts": "num_local_experts"}),
    Family("olmoe", "OlmoeForCausalLM", _olmoe_model, _olmoe_config, llama_rules, _OLMOE,
           aliases={"num_local_experts": "num_experts"}),
    Family("gpt_oss", "GptOssForCausalLM", _gpt_oss_model, _gpt_oss_config, _gpt_oss_rules, _GPT_OSS,
           aliases={"num_experts": "num_local_experts"}),
    Family("gemma3_text", "Gemma3ForCausalLM", _gemma3_model, _gemma3_config, _gemma3_rules, _GEMMA3),
    Family("llama4_text", "Llama4ForCausalLM", _llama4_model, _llama4_config, _llama4_rules, _LLAMA4),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_model, _deepseek_config, _deepseek_rules, _DEEPSEEK,
           aliases={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
           skipped=_deepseek_skipped),
)}

#: our ``model:`` keys that change training but not the function the model computes (ignored when export
#: compares a model with the one its config.json describes)
TRAINING_ONLY = {"dropout", "init", "lb_loss_coef", "z_loss_coef", "lb_loss_type", "dispatch", "jitter",
                 "bias_update_speed", "min_capacity", "drop_policy", "multiple_of", "hidden_mult", "expert_hidden_mult"}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise HFError(f"config.json: model_type '{model_type}' is not supported (supported: "
                      f"{', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]

