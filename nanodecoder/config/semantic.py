"""Cross-field checks that JSON Schema cannot express, run after the schema passes.

Each check returns ``(path, message)`` pairs; paths are key tuples so the
caller can look up the YAML line.  Components can add their own checks with a
``check_params(params, ctx) -> [(relative_path_tuple, message)]`` classmethod.
"""
from __future__ import annotations

from ..registry import registries
from ..model.spec import DEFAULT_NORM, selected_layers


def _block_origins(model: dict) -> list[dict[str, tuple]]:
    """For every layer, where each block part was defined (as a key path)."""
    n = model["n_layers"]
    parts = ("norm", "attention", "mlp")
    origins = [{p: ("model", "block", p) for p in parts} for _ in range(n)]
    for j, ov in enumerate(model.get("overrides", [])):
        for i in selected_layers(ov["layers"], n):
            if 0 <= i < n:
                for p in parts:
                    if p in ov:
                        origins[i][p] = ("model", "overrides", j, p)
    return origins


def _get(raw: dict, path: tuple):
    node = raw
    for k in path:
        node = node[k]
    return node


def model_checks(raw: dict) -> list[tuple[tuple, str]]:
    model = raw["model"]
    out: list[tuple[tuple, str]] = []
    n, d = model["n_layers"], model["d_model"]
    for j, ov in enumerate(model.get("overrides", [])):
        sel = ov["layers"]
        if isinstance(sel, list):
            for k, i in enumerate(sel):
                if i >= n:
                    out.append((("model", "overrides", j, "layers", k),
                                f"layer {i} does not exist; the model has {n} layers (0..{n - 1})"))
        elif sel.get("start", 0) >= n:
            out.append((("model", "overrides", j, "layers", "start"),
                        f"start {sel['start']} selects no layer; the model has {n} layers (0..{n - 1})"))
    rope = model.get("positional", {}).get("kind") == "rope"
    seen: set[tuple] = set()
    head_dims: dict[int, tuple] = {}
    for layer, origin in enumerate(_block_origins(model)):
        for part, path in origin.items():
            if path in seen:
                continue
            seen.add(path)
            params = _get(raw, path) if path != ("model", "block", "norm") or "norm" in model["block"] \
                else DEFAULT_NORM
            if part == "attention" and params.get("kind") == "causal":
                h = params["n_heads"]
                kv = params.get("n_kv_heads") or h
                if d % h:
                    out.append((path + ("n_heads",), f"d_model ({d}) must be divisible by n_heads ({h}); "
                                                     f"choose n_heads among {_divisors(d)}"))
                    continue
                if h % kv:
                    out.append((path + ("n_kv_heads",), f"n_heads ({h}) must be divisible by n_kv_heads ({kv}); "
                                                        f"choose n_kv_heads among {_divisors(h)}"))
                hd = d // h
                if rope and hd % 2:
                    out.append((path + ("n_heads",), f"RoPE needs an even head dimension, but d_model/n_heads = "
                                                     f"{d}/{h} = {hd}; change n_heads or d_model"))
                head_dims.setdefault(hd, path)
            reg = registries()[part]
            cls = reg.get(params["kind"]) if params.get("kind") in reg else None
            hook = getattr(cls, "check_params", None)
            if hook is not None:
                out.extend((path + tuple(rel), msg) for rel, msg in hook(params, d_model=d))
    if rope and len(head_dims) > 1:
        (hd2, path2) = list(head_dims.items())[1]
        out.append((path2 + ("n_heads",), f"with RoPE every layer needs the same head dimension; this block gives "
                                          f"{hd2}, the first gives {list(head_dims)[0]}"))
    return out


def _divisors(n: int) -> str:
    ds = [k for k in range(1, n + 1) if n % k == 0]
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")
