"""Fair comparisons of blueprint variants: one corpus and validation split, matched budgets, seeds paired.

    variants = [load_variant("A", "a.yaml"), load_variant("B", "a.yaml", ["model.n_layers=2"])]
    check_comparable(variants)                          # the same tokens and validation split, or CompareError
    prep = resolve_vocab(variants)                      # the prepared data; every model's vocabulary resolved
    steps = matched_steps(variants, "tokens")           # the reference (first) variant's train.steps, scaled
    ... train each variant x seed (ordinary run folders; ``python -m nanodecoder.compare`` does it) ...
    results = {(v.label, seed): read_run(run_dir, whole_split_loss(run_dir)) for ...}
    summary = summarise(plan, results, seeds)           # mean ± std, and the difference to the first variant
    markdown(summary); plot(summary, "comparison.png")  # with a 95% interval paired by seed

**Matching.**  ``steps``: every variant trains the first variant's ``train.steps``; ``tokens``: the same tokens
(steps scaled by tokens per step); ``flops``: the same training FLOPs (the analytic planner's
:func:`~nanodecoder.model.plan.flops_per_token`, times tokens); ``time``: the step count that fills the same
wall-clock budget at each variant's step time, measured beforehand in one process, alternating
(``throughput.py``).  The runs then train a fixed step count, so every schedule anneals fully.

**The validation loss** is the whole split's (what docs/speedrun.md calls *val (full)*): the mean loss per
token over every token of the prepared validation split, in non-overlapping windows of the model's context,
from the final checkpoint (:func:`~nanodecoder.eval.text.evaluate_tokens`, the evaluation of
``python -m nanodecoder.eval --task text``).

**The interval** is Student's t on the per-seed differences (variant minus first, the same seed: the same batch
order and, where the shapes match, the same initialisation), two-sided 95%: mean ± t(0.975, n-1) · sd / √n.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Blueprint
from ..config.declare import params, to_yaml
from ..config.diff import ABSENT, differences
from ..config.loader import dotted
from ..data import cache_root, check_fits, find_prepared, prepare_data
from ..eval.text import evaluate_tokens
from ..model.params import ParamReport
from ..model.plan import flops_per_token, human_count, human_flops, param_report
from ..model.throughput_model import Workload, calibrate, predict, workload
from ..runtime import profile_precision, resolve_profile
from ..train.checkpoint import CheckpointManager
from ..train.metrics import read_rows
from ..train.plots import _pyplot, _save
from ..train.rundir import RunDir
from ..train.spec import TrainSpec
from .blueprint import RunSpec, load_blueprint, run_spec
from .loading import load_run_model

MATCHES = ("steps", "tokens", "flops", "time")
#: the data settings that decide the tokens and the validation split (``sampling`` only orders the batches)
DATA_KEYS = ("source", "tokenizer")
CONFIDENCE = 0.95


class CompareError(Exception):
    """Variants that cannot be compared, or a comparison folder that holds another comparison."""


# ---------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One blueprint with its overrides, validated; ``spec`` has the vocabulary resolved once
    :func:`resolve_vocab` ran."""
    label: str                       # "A", "B", ...: the order given, A is the reference
    blueprint: str                   # the path (or shipped name) as given
    overrides: tuple[str, ...]       # --set (all variants) then --set-<label> (this one)
    bp: Blueprint
    spec: RunSpec

    @property
    def name(self) -> str:
        return self.bp.name

    @property
    def path(self) -> Path:
        return Path(self.bp.path).resolve()

    @property
    def base_dir(self) -> Path:
        """Where the blueprint's relative data paths start (its folder)."""
        return self.path.parent

    @property
    def tokens_per_step(self) -> int:
        return self.spec.train.tokens_per_step(self.spec.model.context_length)

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.spec.model)

    @property
    def params(self) -> ParamReport:
        return param_report(self.spec.model)

    def describe(self) -> str:
        return f"{self.label} ({self.blueprint}" + (f" --set {' '.join(self.overrides)})" if self.overrides else ")")


def variant_label(index: int) -> str:
    return chr(ord("A") + index)


def load_variant(label: str, blueprint: str, overrides: list[str] | tuple[str, ...] = ()) -> Variant:
    """A validated variant (every problem of the blueprint and its overrides at once: BlueprintError); a
    fine-tuning blueprint or one without a data section is refused (CompareError, the caller names the variant)."""
    bp = load_blueprint(blueprint, list(overrides))
    spec = run_spec(bp)
    if spec.finetune is not None:
        raise CompareError("a fine-tuning blueprint: a comparison trains every variant from scratch on one corpus; "
                           "give pre-training blueprints (with a data: section)")
    if spec.data is None:
        raise CompareError("no data: section: a comparison trains every variant on the same corpus; add "
                           "data.source and data.tokenizer")
    return Variant(label, str(blueprint), tuple(overrides), bp, spec)


def _shown(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value, default=str)


def data_differences(a: Variant, b: Variant) -> list[str]:
    """The data settings that decide the tokens or the validation split and differ between two variants
    (``data.tokenizer.kind: "char" in A, "byte" in B``); empty when they train and validate on the same tokens.
    Equal settings that read different files (relative paths from two folders) are a difference too."""
    out = []
    for key in DATA_KEYS:
        old, new = to_yaml(getattr(a.spec.data, key)), to_yaml(getattr(b.spec.data, key))
        out += [f"data.{dotted((key, *d.path))}: {_shown(d.old)} in {a.label}, {_shown(d.new)} in {b.label}"
                for d in differences(old, new)]
    if not out and a.base_dir != b.base_dir:
        root = cache_root()
        fa = a.spec.data.source.build(base_dir=a.base_dir, cache_root=root).fingerprint()
        fb = b.spec.data.source.build(base_dir=b.base_dir, cache_root=root).fingerprint()
        if fa != fb:
            out.append(f"data.source: the same settings read different data from {a.base_dir} ({a.label}) and "
                       f"{b.base_dir} ({b.label})")
    return out


def check_comparable(variants: list[Variant]) -> None:
    """Refuse (CompareError, one message naming every differing key) variants whose losses would not compare:
    another corpus, tokenizer or validation split than the first variant's."""
    if len(variants) < 2:
        raise CompareError(f"a comparison needs at least two variants (got {len(variants)}); give two or more "
                           "blueprints (the same one twice with --set-b ... for a change of one setting)")
    found = [d for v in variants[1:] for d in data_differences(variants[0], v)]
    if found:
        raise CompareError("the variants do not train and validate on the same tokens, so their losses would not "
                           f"compare: {'; '.join(found)}; give every variant the first one's data.source and "
                           "data.tokenizer")


def resolve_vocab(variants: list[Variant], progress: bool = True):
    """The prepared data of the (common) data section, with every variant's ``model.vocab_size: auto`` resolved
    to the tokenizer's and the data checked against each model (context, vocabulary): DataError otherwise."""
    first = variants[0]
    prep = prepare_data(first.spec.data, base_dir=first.base_dir, progress=progress)
    for v in variants:
        v.spec = v.spec.with_vocab(prep.tokenizer.vocab_size)
        check_fits(prep, v.spec.model.context_length, v.spec.model.vocab_size)
    return prep


# ---------------------------------------------------------------------------------------- matching
def budget_seconds(text: str) -> float:
    """``90s``, ``10m``, ``1h30m`` -> seconds, in the format of ``train.time_budget`` (its declaration's pattern
    and its conversion); ValueError otherwise."""
    pattern = dict(next(p for f, p in params(TrainSpec) if f.name == "time_budget").keywords)["pattern"]
    if not re.fullmatch(pattern, text or ""):
        raise ValueError(f"--budget {text}: not a duration; write it as train.time_budget is written, e.g. 90s, "
                         "10m or 1h30m")
    seconds = TrainSpec(time_budget=text).time_budget_s
    if not seconds:
        raise ValueError(f"--budget {text}: no time at all; give a positive duration, e.g. 90s")
    return seconds


def matched_steps(variants: list[Variant], match: str, *, step_seconds: list[float] | None = None,
                  budget_s: float | None = None) -> list[int]:
    """Each variant's step count under ``match`` (see the module docstring); ``time`` needs the measured
    ``step_seconds`` of each variant and the ``budget_s``."""
    if match == "time":
        if step_seconds is None or budget_s is None:
            raise ValueError("--match time needs each variant's step time and a budget")
        return [max(1, int(budget_s // s)) for s in step_seconds]
    if match not in MATCHES:
        raise ValueError(f"--match {match}: use one of {', '.join(MATCHES)}")
    cost = {"steps": lambda v: 1.0, "tokens": lambda v: float(v.tokens_per_step),
            "flops": lambda v: v.tokens_per_step * v.flops_per_token}[match]
    target = variants[0].spec.train.steps * cost(variants[0])
    return [max(1, round(target / cost(v))) for v in variants]


# ---------------------------------------------------------------------------------------- the plan on disk
PLAN = "plan.json"


def identity(variants: list[Variant], match: str, budget_s: float | None) -> str:
    """What makes two invocations the same comparison: every variant's resolved blueprint, in order, and the
    matching (not the seed count, so a rerun with more seeds extends a comparison)."""
    payload = {"match": match, "budget_s": budget_s, "variants": [v.bp.to_yaml() for v in variants]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_dict(variants: list[Variant], match: str, steps: list[int], *, budget_s: float | None = None,
              step_seconds: list[float] | None = None, calibration: dict | None = None,
              predicted_seconds: list[float] | None = None) -> dict:
    """The comparison's plan (``plan.json``): what each variant trains, fixed once so that a rerun resumes
    the same runs (the calibration of ``--match time`` is not measured again)."""
    out = {"identity": identity(variants, match, budget_s), "match": match, "budget_s": budget_s,
           "calibration": calibration, "variants": []}
    for i, (v, n) in enumerate(zip(variants, steps)):
        params = v.params
        out["variants"].append({
            "label": v.label, "name": v.name, "blueprint": v.blueprint, "path": str(v.path),
            "overrides": list(v.overrides), "steps": n, "tokens_per_step": v.tokens_per_step,
            "tokens": n * v.tokens_per_step, "params_total": params.total, "params_active": params.active,
            "flops_per_token": v.flops_per_token, "flops": n * v.tokens_per_step * v.flops_per_token,
            "step_s_measured": None if step_seconds is None else step_seconds[i],
            "step_s_predicted": None if predicted_seconds is None else predicted_seconds[i]})
    return out


def variant_workload(v: Variant) -> Workload:
    """One training step of the variant for the throughput model (its batch, grad_accum and compute precision)."""
    train = v.spec.train
    return workload(v.spec.model, train.batch_size, v.spec.model.context_length, train.grad_accum,
                    profile_precision(resolve_profile(v.spec.runtime)), train.optimizer.states_per_param)


def predicted_step_seconds(variants: list[Variant]) -> list[float]:
    """Each variant's seconds per step as the throughput model predicts them on this machine (one calibration of
    every variant's shapes, alternating: ``model/throughput_model.py``)."""
    works = [variant_workload(v) for v in variants]
    machine = calibrate(works)
    return [predict(w, machine).seconds for w in works]


def read_plan(folder: Path) -> dict | None:
    f = Path(folder) / PLAN
    if not f.is_file():
        return None
    try:
        plan = json.loads(f.read_text())
    except ValueError as e:
        raise CompareError(f"{f} is not valid JSON ({e}); remove it to plan the comparison again") from None
    return plan if isinstance(plan, dict) else None


def check_plan(plan: dict, variants: list[Variant], match: str, budget_s: float | None, folder: Path) -> None:
    """A comparison folder holds one comparison: refuse another one's plan."""
    if plan.get("identity") != identity(variants, match, budget_s):
        was = ", ".join(f"{v.get('label')} {v.get('name')}" for v in plan.get("variants", []))
        raise CompareError(f"{folder} holds another comparison ({was}, --match {plan.get('match')}): the variants, "
                           "their settings or the matching differ from this command's; give another --out, or "
                           "remove the folder to start over")


# ---------------------------------------------------------------------------------------- runs
def run_name(label: str, variant_name: str, seed: int) -> str:
    """The run's name: its folder is ``<comparison>/runs/<name>/<timestamp>/``."""
    return f"{label}-{variant_name}-seed{seed}"


def final_eval(run_dir: Path, steps: int) -> dict | None:
    """The validation row logged after the last step (``steps``), or None."""
    rows = read_rows(Path(run_dir) / RunDir.METRICS)
    found = [r for r in rows if r.get("kind") == "eval" and r.get("step") == steps and r.get("val_loss") is not None]
    return found[-1] if found else None


def is_finished(run_dir: Path, steps: int) -> bool:
    """A run folder that trained ``steps`` steps: its latest checkpoint is the one of the last step and its
    metrics hold that step's evaluation."""
    latest = RunDir(run_dir).checkpoints.latest()
    return latest is not None and latest.name == CheckpointManager.name(steps) and \
        final_eval(run_dir, steps) is not None


def find_run(parent: Path, steps: int) -> tuple[str, Path | None]:
    """The state of one variant x seed under its run name's folder: ``("done", run)`` when a run finished,
    ``("resume", run)`` when one has a checkpoint to continue from (the newest), ``("new", None)`` else."""
    parent = Path(parent)
    runs = sorted(p for p in parent.iterdir() if (p / RunDir.BLUEPRINT).is_file()) if parent.is_dir() else []
    for run in reversed(runs):
        if is_finished(run, steps):
            return "done", run
    for run in reversed(runs):
        latest = RunDir(run).checkpoints.latest()
        if latest is not None and int(latest.name.rsplit("_", 1)[1]) < steps:
            return "resume", run
    return "new", None


def whole_split_loss(run_dir: Path, batch_size: int = 32) -> dict:
    """The final checkpoint's loss over the whole validation split of the run's prepared data (see the module
    docstring): ``{loss, bpb, tokens, bytes, checkpoint, ...}``."""
    run = RunDir.open(run_dir)
    model, tokenizer, ckpt, spec = load_run_model(run.path, "latest")
    base_dir = Path(run.meta().get("base_dir", run.path))
    prep = find_prepared(spec.data, base_dir) or prepare_data(spec.data, base_dir=base_dir, progress=False)
    n_bytes = (prep.manifest.get("n_bytes") or {}).get("val")
    result = evaluate_tokens(model, tokenizer, prep.val, n_bytes, batch_size=batch_size, name="the validation split")
    return {**result, "checkpoint": ckpt.name, "run_dir": str(run.path)}


def read_run(run_dir: Path, val: dict) -> dict:
    """One finished run's numbers from its metrics: throughput (median tokens/s of the logged windows after
    the first, which holds start-up and compilation), training wall time, and the validation curve, each
    evaluation at the wall time of its step (linear between the logged train rows); ``val``: its whole-split
    evaluation."""
    rows = read_rows(Path(run_dir) / RunDir.METRICS)
    train = [r for r in rows if r.get("kind") == "train" and r.get("elapsed_s") is not None]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    rates = rates[1:] if len(rates) > 1 else rates
    xs, ts = [r["step"] for r in train], [r["elapsed_s"] for r in train]
    curve = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"],
              "elapsed_s": float(np.interp(r["step"], xs, ts)) if xs else None} for r in evals]
    return {"run_dir": str(run_dir), "val_loss": val["loss"], "val_bpb": val.get("bpb"),
            "val_tokens": val["tokens"], "checkpoint": val.get("checkpoint"),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "train_s": ts[-1] if ts else None, "curve": curve}


# ---------------------------------------------------------------------------------------- statistics
#: Two-sided 95% critical values of Student's t, t(0.975, df) for df = 1..30: NIST/SEMATECH e-Handbook of
#: Statistical Methods, section 1.3.6.7.2 "Critical Values of the Student's t Distribution" (column 0.975).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959963984540054


def t_critical(df: int) -> float:
    """t(0.975, df): the table above for df <= 30, beyond it the Cornish-Fisher expansion of Abramowitz & Stegun
    26.7.5 (error under 1e-4 there)."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_std(values: list[float]) -> dict:
    """``{n, mean, std}`` (sample standard deviation; None for one value)."""
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def paired_interval(reference: dict[int, float], other: dict[int, float]) -> dict | None:
    """The difference ``other - reference`` over the seeds both have: ``{n, mean, std, low, high}`` with the
    two-sided 95% Student t interval of its mean (``low``/``high`` None for one seed); None without a common
    seed."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None
    diffs = [other[s] - reference[s] for s in seeds]
    out = {**mean_std(diffs), "seeds": seeds, "low": None, "high": None, "confidence": CONFIDENCE}
    if len(diffs) > 1:
        half = t_critical(len(diffs) - 1) * out["std"] / math.sqrt(len(diffs))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


# ---------------------------------------------------------------------------------------- the result
def summarise(plan: dict, results: dict[tuple[str, int], dict], seeds: list[int]) -> dict:
    """``comparison.json``: the plan's variants with their runs' numbers over ``seeds`` and the paired
    difference of each to the first variant."""
    out = {key: plan.get(key) for key in ("match", "budget_s", "calibration")}
    out.update(seeds=list(seeds), confidence=CONFIDENCE, variants=[])
    reference: dict[int, float] = {}
    for i, pv in enumerate(plan["variants"]):
        runs = {s: results[(pv["label"], s)] for s in seeds if (pv["label"], s) in results}
        per_seed = {s: r["val_loss"] for s, r in runs.items()}
        if i == 0:
            reference = per_seed
        rates = [r["tokens_per_s"] for r in runs.values() if r.get("tokens_per_s")]
        bpb = [r["val_bpb"] for r in runs.values() if r.get("val_bpb") is not None]
        out["variants"].append({
            **pv,
            "val_loss": {**mean_std(list(per_seed.values())), "per_seed": {str(s): v for s, v in per_seed.items()}},
            "val_bpb": mean_std(bpb) if bpb else None,
            "tokens_per_s": mean_std(rates) if rates else None,
            "train_s": mean_std([r["train_s"] for r in runs.values() if r.get("train_s") is not None]),
            "vs_first": None if i == 0 else paired_interval(reference, per_seed),
            "runs": [{"seed": s, **r} for s, r in runs.items()]})
    return out


def _pm(stat: dict | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def _difference(d: dict | None) -> str:
    if d is None:
        return "(reference)"
    text = f"{d['mean']:+.4f}"
    if d["low"] is not None:
        verdict = "lower" if d["high"] < 0 else "higher" if d["low"] > 0 else "no difference shown"
        text += f" [{d['low']:+.4f}, {d['high']:+.4f}] ({verdict})"
    return text


def markdown(summary: dict) -> str:
    """The comparison as a markdown table with its notes (what ``comparison.md`` holds, and the screen)."""
    seeds = summary["seeds"]
    match = summary["match"]
    common = [o for o in summary["variants"][0]["overrides"] if all(o in v["overrides"] for v in summary["variants"])]
    budget = f" ({summary['budget_s']:g} s each)" if match == "time" and summary.get("budget_s") else ""
    lines = [f"# Comparison: {' vs '.join(v['label'] + ' ' + v['name'] for v in summary['variants'])}", "",
             f"Matched by {match}{budget}; {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), paired by seed."
             + (f" Every variant with --set {' '.join(common)}." if common else ""), "",
             "| variant | steps | tokens | params (total / active) | FLOPs/token | FLOPs | tokens/s "
             "| predicted tokens/s | vs A: measured / predicted | val loss (whole split) | Δ vs A, 95% CI |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    first = summary["variants"][0]
    for v in summary["variants"]:
        own = [o for o in v["overrides"] if o not in common]
        what = v["label"] + " " + v["name"] + (f" ({' '.join(own)})" if own else "")
        rate = "-" if not v["tokens_per_s"] else f"{v['tokens_per_s']['mean']:,.0f}"
        lines.append(
            f"| {what} | {v['steps']:,} | {v['tokens']:,} | {human_count(v['params_total'])} / "
            f"{human_count(v['params_active'])} | {human_flops(v['flops_per_token'])} | {human_flops(v['flops'])} | "
            f"{rate} | {_predicted_rate(v)} | {_rate_ratios(v, first)} | {_pm(v['val_loss'])} | "
            f"{_difference(v['vs_first'])} |")
    lines += ["", "val loss: mean ± standard deviation over the seeds of the loss per token over the whole "
                  "validation split, final checkpoint, non-overlapping windows of each model's context.",
              "Δ vs A: the variant's loss minus A's, seed by seed; the interval is Student's t, two-sided 95%, on "
              "those differences (negative: lower loss than A)."]
    if len(seeds) < 2:
        lines.append("One seed: the means are shown without an interval (an interval needs --seeds 2 or more).")
    if any(v.get("step_s_predicted") for v in summary["variants"]):
        lines.append("predicted tokens/s: the throughput model's (FLOPs and bytes moved at rates a micro-benchmark "
                     "measured on this machine before training, model/throughput_model.py); vs A: each variant's "
                     "tokens/s over A's, measured / predicted.")
    if summary.get("calibration"):
        c = summary["calibration"]
        lines.append(f"Step times measured in one process before training, alternating ({c['rounds']} rounds of "
                     f"{c['steps']} steps after {c['warmup']} warm-up): "
                     + ", ".join(f"{v['label']} {1000 * v['step_s_measured']:.1f} ms"
                                 for v in summary["variants"]) + ".")
    return "\n".join(lines) + "\n"


def _predicted_rate(v: dict) -> str:
    s = v.get("step_s_predicted")
    return f"{v['tokens_per_step'] / s:,.0f}" if s else "-"


def _rate_ratios(v: dict, first: dict) -> str:
    """``measured / predicted`` tokens/s of ``v`` over the first variant's (``-`` for what is missing)."""
    m, m0 = (x["tokens_per_s"]["mean"] if x.get("tokens_per_s") else None for x in (v, first))
    p, p0 = (x.get("step_s_predicted") for x in (v, first))
    measured = f"{m / m0:.3f}" if m and m0 else "-"
    predicted = f"{(v['tokens_per_step'] / p) / (first['tokens_per_step'] / p0):.3f}" if p and p0 else "-"
    return f"{measured} / {predicted}"


def plot(summary: dict, path: Path) -> Path | None:
    """Validation loss (the runs' logged evaluations) against training wall time and against training FLOPs,
    each seed thin, and per variant the mean of its seeds with their range as a band where all of them have
    evaluations; None (and a line saying so) when matplotlib is not installed."""
    try:
        plt = _pyplot()
    except ImportError:
        print("matplotlib is not installed: no comparison plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {ax: iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10) for ax in axes}
    for v in summary["variants"]:
        curves = [r["curve"] for r in v["runs"] if r["curve"]]
        if not curves:
            continue
        for ax, x in zip(axes, ("elapsed_s", "flops")):
            xs = [[p["elapsed_s"] if x == "elapsed_s" else p["tokens"] * v["flops_per_token"] for p in c]
                  for c in curves]
            ys = [[p["val_loss"] for p in c] for c in curves]
            label = f"{v['label']} {v['name']}"
            color = next(colors[ax])
            for cx, cy in zip(xs, ys):              # each seed, thin
                ax.plot(cx, cy, "o-" if len(cx) == 1 else "-", color=color, lw=0.8, ms=3, alpha=0.5)
            grid = np.linspace(min(c[0] for c in xs), max(c[-1] for c in xs), 100)
            band = np.array([np.interp(grid, cx, cy, left=np.nan, right=np.nan) for cx, cy in zip(xs, ys)])
            common = ~np.isnan(band).any(axis=0)    # where every seed has evaluations around
            if common.sum() > 1:
                ax.plot(grid[common], band[:, common].mean(axis=0), color=color, lw=2, label=label)
                ax.fill_between(grid[common], band[:, common].min(axis=0), band[:, common].max(axis=0),
                                color=color, alpha=0.25)
            else:
                ax.plot([], [], color=color, lw=2, label=label)
    for ax, name in zip(axes, ("training wall time (s)", "training FLOPs")):
        ax.set_xlabel(name)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("validation loss as logged during training (train.eval_steps batches); thin: each seed, thick: "
                 "their mean and range where all seeds have evaluations", fontsize=9)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)
