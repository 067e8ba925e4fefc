"""Plan blueprints before renting hardware: parameters, FLOPs per token and training memory, from the spec alone.

    python tools/param_count.py BLUEPRINT [BLUEPRINT ...] [--context N] [--batch N] [--precision bf16]
        [--optimizer adamw] [--activation-checkpointing] [--profile NAME] [--world-size N] [--set KEY=VALUE] [--json]
        [--cluster "nodes=N,gpus_per_node=8,gpu_memory=80GiB"]
    python tools/param_count.py --compare A.yaml B.yaml [same options]
    python tools/param_count.py BLUEPRINT [BLUEPRINT ...] --throughput [--against OTHER.yaml]

Nothing is built and no data is prepared: every number is arithmetic on the blueprint's spec (see
``nanodecoder/model/plan.py`` for the conventions), so a 671B-parameter blueprint plans in well under a second.
Defaults come from the blueprint: the context is its context_length, the precision its runtime profile's, the
optimizer its train.optimizer; the batch is one sequence per device.  With ``--world-size N`` the figures are per
device of N (``--set runtime.expert_parallel=E`` splits the routed experts over E of them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..model.cluster import (Cluster, ClusterError, LayoutPlan, base_plan, cluster_plans, frontier, parse_cluster,
                             smallest_cluster)
from ..model.plan import Plan, Setting, expert_parallel_degrees, human_bytes, human_count, human_flops, plan
from ..runtime import AUTO, available_profiles, planned_device_type, profile_precision, resolve_profile
from ..runtime.profiles import PRECISIONS
from ..config import BlueprintError
from ..model.throughput_model import Workload, calibrate, predict, workload
from .blueprint import blueprint_model_spec, run_spec
from .common import fail, user_errors

#: what each parameter figure counts, and which published numbers use it
MEANINGS = {
    "total": "every distinct parameter (a tied head once)",
    "active": "what one token uses (routed experts count top_k of n_experts), both embeddings counted: "
              "the convention of Mixtral's published 12.9B",
    "active_non_embedding": "active without the input embedding (token + learned positions; an untied head "
                            "counted): the convention of published active counts such as DeepSeek-V3's 37B "
                            "and GPT-OSS-120b's 5.1B",
    "non_embedding": "total without the embeddings (Kaplan et al.'s N)",
}
ASSUMPTIONS = ("activations: what autograd saves for the backward as our components produce it (no "
               "recomputation unless checkpointing), the residual stream, norms and router in fp32, the rest in "
               "the compute precision, fp32 logits and their gradient; everything summed as if alive at once; "
               "not counted: allocator fragmentation, the CUDA context (~0.5 GiB)")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python tools/param_count.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("blueprints", nargs="*", help="blueprint files or shipped names (zoo/gpt_oss_120b)")
    ap.add_argument("--compare", nargs="+", metavar="BLUEPRINT", default=[],
                    help="two or more blueprints side by side, with each one's ratio to the first")
    ap.add_argument("--context", type=int, metavar="N", help="tokens per sequence (default: model.context_length)")
    ap.add_argument("--batch", type=int, default=1, metavar="N", help="sequences per micro-batch on each device")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="compute precision (default: the runtime profile's); weights stay fp32")
    ap.add_argument("--optimizer", metavar="KIND", help="optimizer kind (default: train.optimizer)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="the run recomputes each block in the backward (both plans are printed either way)")
    ap.add_argument("--profile", choices=[AUTO, *available_profiles()], metavar="NAME",
                    help="runtime profile (precision, device kernels, data_parallel): " + ", ".join(available_profiles()))
    ap.add_argument("--world-size", type=int, default=1, metavar="N",
                    help="devices of the job (data parallel as the profile says: ddp replicates, fsdp shards; "
                         "runtime.expert_parallel splits the routed experts; a MoE model's report adds the "
                         "per-device memory of every expert-parallel degree)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override blueprint values, e.g. --set model.n_layers=2 runtime.data_parallel=fsdp")
    ap.add_argument("--cluster", metavar="SPEC",
                    help="plan every FSDP x expert-parallel x checkpointing layout on a cluster, e.g. "
                         "'nodes=4,gpus_per_node=8,gpu_memory=80GiB' (also gpu=h100|h800|h200|a100|b200, "
                         "gpu_flops=989e12, mfu=0.4): memory per GPU, bytes communicated per step, step time and "
                         "tokens/s at the stated MFU, and the smallest cluster that fits")
    ap.add_argument("--throughput", action="store_true",
                    help="predict training tokens/s on this machine (train.batch_size x grad_accum per step) from "
                         "FLOPs and bytes moved, calibrated by a few seconds of micro-benchmarks of the model's "
                         "shapes (model/throughput_model.py); with --against: the ratio of each to it")
    ap.add_argument("--against", metavar="BLUEPRINT", help="with --throughput: the reference blueprint of the ratios")
    ap.add_argument("--json", action="store_true", help="print everything as one JSON object keyed by blueprint")
    args = ap.parse_args(argv)
    if not args.blueprints and not args.compare:
        ap.error("give one or more BLUEPRINTs, or --compare A B")
    if args.against and not args.throughput:
        ap.error("--against is the reference of --throughput's ratios; add --throughput")
    if len(args.compare) == 1:
        ap.error("--compare needs two or more blueprints")
    if args.cluster is not None:
        if args.compare:
            ap.error("--cluster plans one blueprint at a time; leave out --compare")
        try:
            args.cluster = parse_cluster(args.cluster)
        except ClusterError as e:
            ap.error(str(e))
    for flag in ("context", "batch", "world_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def flag_overrides(args) -> list[str]:
    """The flags as the blueprint overrides they stand for (validated like any --set)."""
    out = list(args.overrides)
    if args.profile:
        out.append(f"runtime.profile={args.profile}")
    if args.precision:
        out.append(f"runtime.precision={args.precision}")
    if args.optimizer:
        out.append(f"train.optimizer={{kind: {args.optimizer}}}")
    if args.activation_checkpointing:
        out.append("runtime.activation_checkpointing=true")
    return out


def plan_blueprint(path: str, args) -> tuple[str, Plan]:
    """``(name, plan)`` of one blueprint under the command line's settings."""
    name, p, _ = plan_run(path, args)
    return name, p


def plan_run(path: str, args):
    """``(name, plan, run spec)`` of one blueprint under the command line's settings (read once)."""
    bp, model = blueprint_model_spec(path, flag_overrides(args))
    spec = run_spec(bp)
    profile = resolve_profile(spec.runtime)
    context = args.context or model.context_length
    if context > model.context_length:
        raise BlueprintError([bp.problem(("model", "context_length"), (
            f"--context {context} is longer than the model's context_length ({model.context_length}); "
            f"plan it with --set model.context_length={context}"))])
    setting = Setting(context=context, batch=args.batch, precision=profile_precision(profile),
                      optimizer_states=spec.train.optimizer.states_per_param, optimizer=spec.train.optimizer.kind,
                      world_size=args.world_size, sharded=profile.data_parallel == "fsdp" and args.world_size > 1,
                      expert_parallel=profile.expert_parallel, checkpointing=profile.activation_checkpointing,
                      device=planned_device_type(profile))
    try:
        return bp.name, plan(model, setting), spec
    except ValueError as e:        # runtime.expert_parallel does not divide the processes or the experts
        raise BlueprintError([bp.problem(("runtime", "expert_parallel"), str(e).removeprefix(
            "runtime.expert_parallel: ") + f" (--world-size {args.world_size})")]) \
            from None


def expert_parallel_plans(p: Plan) -> list[Plan]:
    """``p`` under every expert-parallel degree its processes and every MoE layer's experts allow (1 first); empty
    for a dense model or one process."""
    st = p.setting
    degrees = expert_parallel_degrees(p.spec, st.world_size)
    if len(degrees) < 2:
        return []
    return [dataclasses.replace(p, setting=dataclasses.replace(st, expert_parallel=n)) for n in degrees]


def expert_parallel_table(p: Plan) -> list[str]:
    """Per-device memory of each expert-parallel layout of ``p``'s processes (the run's marked)."""
    plans = expert_parallel_plans(p)
    if not plans:
        return []
    lines = [f"per device by runtime.expert_parallel on {p.setting.world_size} processes (routed experts split, "
             f"the rest {'sharded' if p.setting.sharded else 'replicated'})",
             f"  {'expert_parallel':<18} {'parameters':>11} {'weights+grads+opt.':>19} {'total':>11} "
             f"{'total, ckpt':>11}"]
    for q in plans:
        n = q.setting.expert_parallel
        lines.append(f"  {str(n) + (' (this run)' if n == p.setting.expert_parallel else ''):<18} "
                     f"{human_count(q.params_per_device):>11} {human_bytes(q.memory(False).model_state):>19} "
                     f"{human_bytes(q.memory(False).total):>11} {human_bytes(q.memory(True).total):>11}")
    return lines + [""]


def report(name: str, path: str, p: Plan) -> str:
    """The readable report of one blueprint."""
    s, st, pr, f = p.spec, p.setting, p.params, p.flops
    tokens = st.batch * st.context
    figures = {"total": pr.total, "active": pr.active, "active_non_embedding": pr.active_non_embedding,
               "non_embedding": pr.non_embedding}
    lines = [f"== {name} ({path}): vocab {s.vocab_size:,}, context_length {s.context_length:,}, "
             f"{s.n_layers} layers, d_model {s.d_model:,}", pr.table(), "", "parameters"]
    labels = {"total": "total", "active": "active per token", "active_non_embedding": "active, no embeddings",
              "non_embedding": "non-embedding"}
    lines += [f"  {labels[k]:<24} {human_count(v):>10}   {MEANINGS[k]}" for k, v in figures.items()]
    lines += ["", f"FLOPs per token at context {st.context:,} (model FLOPs; causal: the token at position t "
                  "attends t + 1 keys, a windowed layer at most its window, averaged over the sequence)",
              f"  {'forward':<24} {human_flops(f.forward):>12}   weight matmuls {human_flops(f.block_matmuls + f.head)}"
              f" + attention {human_flops(f.attention)}",
              f"  {'training':<24} {human_flops(f.training):>12}   forward + backward = 3 x forward (the MFU "
              "convention)",
              f"  {'with recomputation':<24} {human_flops(f.training + f.recompute):>12}   + every block's forward "
              "again under activation checkpointing (hardware FLOPs)",
              f"  {'per micro-batch':<24} {human_flops(f.training * tokens * st.world_size):>12}   training, "
              f"{tokens * st.world_size:,} tokens", "",
              f"training memory per device: {st.describe()}", p.memory_table(),
              f"  assumptions: {ASSUMPTIONS}", "", *expert_parallel_table(p),
              f"sampling: weights {human_bytes(pr.total * p.compute_bytes)} in {p.compute_dtype}; KV cache "
              f"{human_bytes(p.kv_cache_per_token)} per token, {human_bytes(p.kv_cache_per_sequence)} per sequence "
              f"of {st.context:,} tokens (windowed layers hold at most their window)", ""]
    return "\n".join(lines)


#: rows of --compare: JSON key, label, how to read the value from a plan, how to show it
COMPARED = (
    ("total", "parameters, total", lambda p: p.params.total, human_count),
    ("active", "active per token", lambda p: p.params.active, human_count),
    ("active_non_embedding", "active, no embeddings", lambda p: p.params.active_non_embedding, human_count),
    ("non_embedding", "non-embedding", lambda p: p.params.non_embedding, human_count),
    ("context", "context", lambda p: p.setting.context, lambda v: f"{v:,}"),
    ("forward_flops", "forward FLOPs/token", lambda p: p.flops.forward, human_flops),
    ("training_flops", "training FLOPs/token", lambda p: p.flops.training, human_flops),
    ("model_state_bytes", "weights+grads+optimizer", lambda p: p.memory().model_state, human_bytes),
    ("activation_bytes", "activations", lambda p: p.memory(False).activations, human_bytes),
    ("activation_bytes_checkpointing", "activations, checkpointing", lambda p: p.memory(True).activations,
     human_bytes),
    ("memory_bytes", "training memory", lambda p: p.memory(False).total, human_bytes),
    ("memory_bytes_checkpointing", "training memory, ckpt", lambda p: p.memory(True).total, human_bytes),
    ("kv_cache_bytes_per_token", "KV cache per token", lambda p: p.kv_cache_per_token, human_bytes),
)


def ratios(plans: list[Plan]) -> list[dict[str, float | None]]:
    """Each plan's values divided by the first plan's, by JSON key (None where the first is 0)."""
    first = plans[0]
    return [{key: (get(p) / get(first) if get(first) else None) for key, _, get, _ in COMPARED} for p in plans[1:]]


def compare_table(names: list[str], plans: list[Plan]) -> str:
    heads = names + [f"{n} / {names[0]}" for n in names[1:]]
    rel = ratios(plans)
    rows = [[label] + [show(get(p)) for p in plans] + [f"{r[key]:.3g}x" if r[key] is not None else "-"
                                                       for r in rel] for key, label, get, show in COMPARED]
    widths = [max(len(r[i]) for r in rows + [[""] + heads]) for i in range(len(heads) + 1)]
    out = ["  ".join([f"{'':<{widths[0]}}"] + [f"{h:>{w}}" for h, w in zip(heads, widths[1:])])]
    out += ["  ".join([f"{r[0]:<{widths[0]}}"] + [f"{v:>{w}}" for v, w in zip(r[1:], widths[1:])]) for r in rows]
    out.append(f"(each at its own context unless --context is given; {plans[0].setting.describe()})")
    return "\n".join(out)


def as_json(p: Plan) -> dict:
    """Everything of one plan, the parameter figures at the top (and what each counts)."""
    out = p.as_dict()
    layouts = [{"expert_parallel": q.setting.expert_parallel, "params_per_device": q.params_per_device,
                "memory_bytes": {"no_checkpointing": q.memory(False).as_dict(),
                                 "activation_checkpointing": q.memory(True).as_dict()}}
               for q in expert_parallel_plans(p)]
    return {**out["params"], "vocab_size": p.spec.vocab_size, "flops_per_token": p.flops.training,
            "meanings": MEANINGS, "assumptions": ASSUMPTIONS, **{k: v for k, v in out.items() if k != "params"},
            "params_per_device": p.params_per_device, **({"expert_parallel_layouts": layouts} if layouts else {})}


def cluster_report(name: str, p: Plan, cluster: Cluster) -> tuple[str, dict]:
    """The layouts of one blueprint on ``cluster`` (for each expert-parallel degree, the least-sharded one that
    fits) and the smallest cluster of its kind that fits, as text and as JSON."""
    base = base_plan(p.spec, p.setting)
    plans = cluster_plans(base, cluster)
    best = frontier(plans)
    smallest = smallest_cluster(base, cluster)
    tokens = base.setting.batch * base.setting.context
    lines = [f"== {name} on {cluster.describe()}: micro-batch {base.setting.batch} x {base.setting.context:,} "
             f"tokens per GPU, {base.setting.precision} compute, {base.setting.optimizer}",
             f"  {'layout':<36} {'memory/GPU':>11} {'all-gather':>11} {'reduce-scat.':>12} {'all-reduce':>11} "
             f"{'all-to-all':>11} {'step':>8} {'tokens/s':>13}"]

    def row(lp: LayoutPlan) -> str:
        return (f"  {lp.layout.describe() + (f' ({lp.replicas} replicas)' if lp.replicas > 1 else ''):<36} "
                f"{human_bytes(lp.memory.total):>11} {human_bytes(lp.all_gather):>11} "
                f"{human_bytes(lp.reduce_scatter):>12} {human_bytes(lp.all_reduce):>11} "
                f"{human_bytes(lp.all_to_all):>11} {lp.step_time:>7.2f}s {lp.tokens_per_s:>13,.0f}")

    lines += [row(lp) for lp in best] or ["  no layout fits: every one needs more than "
                                          f"{human_bytes(cluster.gpu_memory)} per GPU"]
    lines.append(f"  ({sum(lp.fits for lp in plans)} of {len(plans)} layouts fit; shown: for each expert-parallel "
                 "degree the least-sharded one, without checkpointing where that fits; bytes each GPU receives "
                 f"per step of {tokens:,} tokens per GPU)")
    if smallest is None:
        lines.append("  smallest cluster: none up to 65,536 nodes")
    else:
        c, lp = smallest
        lines.append(f"  smallest cluster that fits: {c.nodes:,} node{'s' if c.nodes > 1 else ''} ({c.world:,} GPUs), "
                     f"{lp.layout.describe()}, {human_bytes(lp.memory.total)} per GPU")
    out = {"cluster": dataclasses.asdict(cluster), "layouts": [lp.as_dict() for lp in plans],
           "shown": [lp.as_dict() for lp in best],
           "smallest": None if smallest is None else {"nodes": smallest[0].nodes, **smallest[1].as_dict()}}
    return "\n".join(lines) + "\n", out


def throughput_work(path: str, args) -> tuple[str, Workload]:
    """``(name, workload)``: one training step of the blueprint (its train.batch_size x grad_accum sequences)
    under the command line's settings."""
    name, p, spec = plan_run(path, args)
    train = spec.train
    return name, workload(p.spec, train.batch_size, p.setting.context, train.grad_accum, p.setting.precision,
                          p.setting.optimizer_states)


def throughput_report(paths: list[str], args) -> int:
    """Predicted tokens/s of every blueprint (``--against`` first, the reference of the ratios), one calibration
    for all of them."""
    order = list(dict.fromkeys([*([args.against] if args.against else []), *paths]))
    try:
        works = [(path, *throughput_work(path, args)) for path in order]
    except user_errors() as e:
        return fail(e)
    machine = calibrate([w for _, _, w in works])
    steps = [(path, name, predict(w, machine)) for path, name, w in works]
    ref = steps[0][2]
    if args.json:
        print(json.dumps({"reference": steps[0][0], "machine": machine.as_dict(), "blueprints": {
            path: {"name": name, "step_s": st.seconds, "tokens_per_step": st.tokens_per_step,
                   "tokens_per_s": st.tokens_per_s, "ratio": st.tokens_per_s / ref.tokens_per_s,
                   "parts_s": dict(st.parts)} for path, name, st in steps}}, indent=2))
        return 0
    print(f"predicted training throughput on this machine (FLOPs and bytes moved at rates measured just now; "
          f"model/throughput_model.py), ratios to {steps[0][1]}")
    width = max(len(name) for _, name, _ in steps)
    for path, name, st in steps:
        top = sorted(st.parts.items(), key=lambda kv: -kv[1])
        print(f"  {name:<{width}}  {1000 * st.seconds:8.1f} ms/step  {st.tokens_per_s:>10,.0f} tokens/s  "
              f"{st.tokens_per_s / ref.tokens_per_s:6.3f}x   "
              + ", ".join(f"{part} {1000 * s:.1f}" for part, s in top) + " (ms)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = list(dict.fromkeys([*args.compare, *args.blueprints]))
    if args.throughput:
        return throughput_report(paths, args)
    try:
        planned = [(path, *plan_blueprint(path, args)) for path in paths]
    except user_errors() as e:
        return fail(e)
    compared = [(path, name, p) for path, name, p in planned if path in args.compare]
    if args.cluster is not None:
        reports = {path: cluster_report(name, p, args.cluster) for path, name, p in planned}
        if args.json:
            print(json.dumps({path: {**as_json(p), "cluster_plan": reports[path][1]} for path, _, p in planned},
                             indent=2))
        else:
            print("\n".join(text for text, _ in reports.values()))
        return 0
    if args.json:
        out = {path: as_json(p) for path, _, p in planned}
        if compared:
            out["compare"] = {"baseline": compared[0][0],
                              "ratios": dict(zip([c[0] for c in compared[1:]], ratios([c[2] for c in compared])))}
        print(json.dumps(out, indent=2))
        return 0
    for path, name, p in planned:
        if path not in args.compare:
            print(report(name, path, p))
    if compared:
        print(compare_table([c[1] for c in compared], [c[2] for c in compared]))
    return 0
