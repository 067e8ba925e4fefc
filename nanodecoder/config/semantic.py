"""Cross-field checks that JSON Schema cannot express, run after the schema.

Each check returns ``(path, message)`` pairs; paths are key tuples so the
caller can look up the YAML line.  A check runs only on values that passed
the schema (the caller says which paths are ``clean``), so one mistake is
never reported twice and the others are still all found.  Every block
definition is checked, the shared ``model.block`` and each ``overrides``
entry alike.  Components can add their own checks with a
``check_params(params, *, d_model) -> [(relative_path, message)]`` classmethod.
"""
from __future__ import annotations

from typing import Callable, Iterator

from ..registry import registries
from .loader import dotted

PARTS = ("norm", "attention", "mlp")
Found = Iterator[tuple[tuple, str]]
Clean = Callable[[tuple], bool]


def _layers_word(n: int) -> str:
    return f"the model has {n} layer{'s' if n != 1 else ''} (0..{n - 1})"


def _override_ranges(model: dict, n: int, clean: Clean) -> Found:
    for j, ov in enumerate(model["overrides"]):
        at = ("model", "overrides", j, "layers")
        if not clean(at) or not isinstance(ov, dict) or "layers" not in ov:
            continue
        sel = ov["layers"]
        if isinstance(sel, list):
            for k, i in enumerate(sel):
                if i >= n:
                    yield at + (k,), f"layer {i} does not exist; {_layers_word(n)}"
            continue
        start, stop = sel.get("start", 0), sel.get("stop")
        if start >= n:
            yield at + ("start",), f"start {start} selects no layer; {_layers_word(n)}"
        elif stop is not None and stop > n:
            yield at + ("stop",), f"stop {stop} is past the last layer; {_layers_word(n)} (stop: null goes to the end)"
        elif stop is not None and stop <= start:
            yield at + ("stop",), f"stop {stop} selects no layer; it must be greater than start ({start})"


def _definitions(model: dict, clean: Clean) -> Iterator[tuple[tuple, str, dict]]:
    """``(path, part, params)`` of every clean block part written in the blueprint."""
    entries = [(("model", "block"), model.get("block"))]
    overrides = model.get("overrides")
    if isinstance(overrides, list):
        entries += [(("model", "overrides", j), ov) for j, ov in enumerate(overrides)]
    for at, entry in entries:
        for part in PARTS:
            if isinstance(entry, dict) and isinstance(entry.get(part), dict) and clean(at + (part,)):
                yield at + (part,), part, entry[part]


def _divisors(n: int) -> str:
    ds = [k for k in range(1, n + 1) if n % k == 0]
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def _attention(path: tuple, params: dict, d: int, rope: bool) -> Found:
    h = params.get("n_heads")
    if not isinstance(h, int):
        return
    kv = params.get("n_kv_heads") or h
    if d % h:
        yield path + ("n_heads",), (f"d_model ({d}) must be divisible by n_heads ({h}); "
                                    f"choose n_heads among {_divisors(d)}")
        return
    if isinstance(kv, int) and h % kv:
        yield path + ("n_kv_heads",), (f"n_heads ({h}) must be divisible by n_kv_heads ({kv}); "
                                       f"choose n_kv_heads among {_divisors(h)}")
    if rope and (d // h) % 2:
        yield path + ("n_heads",), (f"RoPE needs an even head dimension, but d_model/n_heads = {d}/{h} = {d // h}; "
                                    "change n_heads or d_model")


def _experts(path: tuple, params: dict) -> Found:
    n, k = params.get("n_experts"), params.get("top_k")
    if isinstance(n, int) and isinstance(k, int) and k > n:
        yield path + ("top_k",), f"top_k ({k}) must be <= n_experts ({n}); each token picks top_k distinct experts"
    router = params.get("router")
    if isinstance(router, dict) and router.get("kind") == "switch" and isinstance(k, int) and k != 1:
        yield path + ("top_k",), (f"router 'switch' sends each token to one expert, so top_k must be 1 (got {k}); "
                                  "for top_k > 1 use router kind 'topk'")


def _size(model: dict, key: str, clean: Clean) -> int | None:
    v = model.get(key)
    return v if clean(("model", key)) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def model_checks(raw: dict, clean: Clean = lambda path: True) -> list[tuple[tuple, str]]:
    """Every cross-field problem of ``raw["model"]``, looking only at ``clean`` paths."""
    model = raw["model"]
    d, n = _size(model, "d_model", clean), _size(model, "n_layers", clean)
    out = list(_override_ranges(model, n, clean)) if n and isinstance(model.get("overrides"), list) else []
    rope = clean(("model", "positional")) and (model.get("positional") or {}).get("kind") == "rope"
    head_dims: dict[int, tuple] = {}
    for path, part, params in _definitions(model, clean):
        if part == "attention" and d:
            found = list(_attention(path, params, d, rope))
            out += found
            if not found and isinstance(params.get("n_heads"), int):
                head_dims.setdefault(d // params["n_heads"], path)
        if part == "mlp":
            out += _experts(path, params)
        reg = registries().get(part)
        hook = getattr(reg.get(params["kind"]), "check_params", None) if reg and params.get("kind") in reg else None
        if hook is not None and d:
            out += [(path + tuple(rel), msg) for rel, msg in hook(params, d_model=d)]
    if rope and len(head_dims) > 1:
        (first, where), (other, path) = list(head_dims.items())[:2]
        out.append((path + ("n_heads",), f"with RoPE every layer needs the same head dimension; this block gives "
                                         f"{other}, {dotted(where)} gives {first}"))
    return out
