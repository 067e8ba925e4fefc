"""Layer-level MoE benchmark (forward + backward), CPU by default.  Prints numbers, asserts nothing.

Compares, on the same tokens and the same routing:
  moe[grouped_mm]  this repo's MoE, sort + ``torch._grouped_mm``
  moe[loop]        this repo's MoE, sort + per-expert loop over contiguous slices
  naive-gather     for each expert: boolean mask of its tokens, gather, run, add back
  naive-dense      for each expert: run it on ALL tokens, multiply by the (mostly zero) gate
  dense            the dense MLP of equal ACTIVE FLOPs (hidden = k * expert hidden)

With ``--model-layers N`` it also times whole decoders (N blocks, rmsnorm, rope, 4 heads,
built by ``nanodecoder.model``): the MoE model vs its dense twin of equal active FLOPs.

Usage:  python tools/bench_moe.py [--tokens 4096 --d-model 256 --experts 8 --top-k 2 --kind swiglu]
                                  [--model-layers 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodecoder.components import component_spec  # noqa: E402
from nanodecoder.components.mlp import DENSE  # noqa: E402
from nanodecoder.components.moe import MoE  # noqa: E402
from nanodecoder.model import build_model, build_model_spec  # noqa: E402


def naive_gather(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per expert: mask its tokens, gather them, run the expert, add back (HF-Mixtral style)."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router(flat)
    ex = moe.experts
    out = torch.zeros_like(flat)
    for e in range(moe.spec.n_experts):
        tok, choice = torch.where(r.indices == e)
        h = ex.act(flat[tok] @ ex.up[e]) @ ex.down[e]
        out = out.index_add(0, tok, h * r.weights[tok, choice, None].to(h.dtype))
    return out.view_as(x)


def naive_dense(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per expert: run it on every token, multiply by the gate (zero where not routed)."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router(flat)
    ex = moe.experts
    gates = torch.zeros(flat.shape[0], moe.spec.n_experts, dtype=flat.dtype).scatter(1, r.indices, r.weights)
    out = torch.zeros_like(flat)
    for e in range(moe.spec.n_experts):
        out = out + gates[:, e:e + 1] * (ex.act(flat @ ex.up[e]) @ ex.down[e])
    return out.view_as(x)


def fwd_bwd_ms(fn, x: torch.Tensor, params, grad: torch.Tensor) -> float:
    """Milliseconds of one forward + backward (gradient w.r.t. input and parameters)."""
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    y = fn(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(grad)
    return (time.perf_counter() - t0) * 1e3


def time_all(runs: dict, x: torch.Tensor, warmup: int, reps: int) -> dict[str, list[float]]:
    """Round-robin over the variants (so machine noise hits all alike); times per variant."""
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, (fn, mod) in runs.items():
            t = fwd_bwd_ms(fn, x, list(mod.parameters()), grad)
            if i >= warmup:
                times[name].append(t)
    return times


def model_level(a, expert_hidden: int, dense_hidden: int) -> None:
    """Whole-model fwd+bwd: MoE decoder vs the dense twin (needs the model package)."""
    def spec(mlp):
        return build_model_spec({
            "vocab_size": 512, "context_length": a.seq_len, "d_model": a.d_model, "n_layers": a.model_layers,
            "positional": {"kind": "rope"},
            "block": {"norm": {"kind": "rmsnorm"}, "attention": {"kind": "causal", "n_heads": 4}, "mlp": mlp}})
    moe = {"kind": "moe", "n_experts": a.experts, "top_k": a.top_k, "expert_kind": a.kind,
           "expert_hidden": expert_hidden}
    models = {"moe model": build_model(spec(moe), seed=0),
              "dense twin": build_model(spec({"kind": a.kind, "hidden_size": dense_hidden}), seed=0)}
    idx = torch.randint(0, 512, (a.tokens // a.seq_len, a.seq_len))
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(a.warmup + a.reps):
        for name, m in models.items():
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            m(idx, idx).loss.backward()
            if i >= a.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    best = {n: min(t) for n, t in times.items()}
    print(f"model level ({a.model_layers} layers, fwd+bwd incl. loss): " + ", ".join(
        f"{n} {best[n]:.1f} ms (median {statistics.median(times[n]):.1f})" for n in models))
    print(f"moe model tokens/s relative to the dense twin: {best['dense twin'] / best['moe model']:.2f}x "
          "(target >= 0.85x)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--kind", default="swiglu", choices=sorted(DENSE))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip-naive-dense", action="store_true")
    ap.add_argument("--model-layers", type=int, default=0, help="also time whole models with this many layers")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    dense_hidden = int(16 * -(-DENSE[a.kind].Spec.hidden_mult * a.d_model // 16))
    expert_hidden = max(4, round(dense_hidden / a.top_k / 4) * 4)  # equal active FLOPs, 16-byte rows
    dense_hidden = expert_hidden * a.top_k
    base = {"kind": "moe", "n_experts": a.experts, "top_k": a.top_k, "expert_kind": a.kind,
            "expert_hidden": expert_hidden, "router": {"kind": "topk"}}
    moes: dict[str, MoE] = {d: component_spec("mlp", {**base, "dispatch": d}, d_model=a.d_model).build()
                            for d in ("grouped_mm", "loop")}
    moes["loop"].load_state_dict(moes["grouped_mm"].state_dict())
    dense = component_spec("mlp", {"kind": a.kind, "hidden_size": dense_hidden}, d_model=a.d_model).build()
    x = torch.randn(a.tokens // a.seq_len, a.seq_len, a.d_model, requires_grad=True)

    ref = moes["loop"]
    with torch.no_grad():  # all paths compute the same function
        y0 = moes["grouped_mm"](x)[0]
        for name, f in (("loop", lambda t: ref(t)[0]), ("naive-gather", lambda t: naive_gather(ref, t))):
            err = (f(x) - y0).abs().max().item()
            print(f"check: moe[grouped_mm] vs {name}: max |diff| = {err:.2e}")

    runs = {"moe[grouped_mm]": (moes["grouped_mm"], moes["grouped_mm"]),
            "moe[loop]": (ref, ref),
            "naive-gather": (lambda t: naive_gather(ref, t), ref),
            "naive-dense": (lambda t: naive_dense(ref, t), ref),
            "dense": (dense, dense)}
    if a.skip_naive_dense:
        runs.pop("naive-dense")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {a.tokens}, d_model {a.d_model}, "
          f"{a.experts} experts top-{a.top_k} {a.kind}, expert hidden {expert_hidden}, dense hidden {dense_hidden}")
    times = time_all(runs, x, a.warmup, a.reps)
    # best of N (as timeit recommends): other processes share this CPU; medians are printed too
    ms = {name: min(t) for name, t in times.items()}
    best = min(ms["moe[grouped_mm]"], ms["moe[loop]"])
    print(f"{'variant':18s} {'best ms':>8s} {'median ms':>10s} {'tokens/s':>10s} {'vs best moe':>11s}")
    for name, t in ms.items():
        print(f"{name:18s} {t:8.1f} {statistics.median(times[name]):10.1f} {a.tokens / t * 1e3:10.0f} "
              f"{t / best:10.2f}x")
    print(f"speed-up of moe over naive-gather: {ms['naive-gather'] / best:.2f}x"
          + (f", over naive-dense: {ms['naive-dense'] / best:.2f}x" if "naive-dense" in ms else ""))
    print(f"moe tokens/s relative to the dense MLP of equal active FLOPs: {ms['dense'] / best:.2f}x "
          "(layer level; the model-level target is >= 0.85x)")
    if a.model_layers:
        model_level(a, expert_hidden, dense_hidden)


if __name__ == "__main__":
    main()
