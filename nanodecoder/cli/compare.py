"""Compare blueprint variants fairly: every variant x seed an ordinary run, budgets matched, seeds paired.

    python -m nanodecoder.compare A.yaml B.yaml [C.yaml ...] [--set KEY=VALUE ...] [--set-a ...] [--set-b ...]
                                  [--seeds 3] [--match steps|tokens|flops|time] [--budget 90s] [--out DIR]

Checks every variant before anything trains (its blueprint and overrides, then training's own checks: ``python
-m nanodecoder.run ... --dry-run``) and that all of them train and validate on the same tokens (``data.source``
and ``data.tokenizer``), fixes each variant's step count (``api/compare.py``: the first variant's ``train.steps``,
scaled to equal tokens or FLOPs, or for ``--match time`` the steps that fill ``--budget`` at each variant's step
time, measured in this process beforehand, alternating) and writes it to ``DIR/plan.json``.  Then it trains the
runs one at a time, alternating the variants (A seed 1, B seed 1, A seed 2, ...) so that a machine whose speed
drifts penalises none of them, each as ``python -m nanodecoder.run BLUEPRINT --set ... train.seed=S
train.steps=N train.time_budget=null logging.runs_dir=DIR/runs name=A-<name>-seedS`` (so under
``DIR/runs/<name>/<timestamp>/``), evaluates each finished run on the whole validation split, and writes
``comparison.md``, ``comparison.json`` and ``comparison.png`` in DIR.

A rerun of the same command skips the finished runs, resumes an interrupted one from its checkpoint
(``--resume``) and trains the rest; with more ``--seeds`` it adds seeds.  ``--set`` applies to every variant,
``--set-a``, ``--set-b``, ... (up to ``--set-z``) to one, after ``--set``.

Exit codes: 0 done; 2 bad input, before anything trains (a variant that does not validate or whose training
checks fail, variants on different data or tokenizers, fewer than two variants, ``--seeds`` below 1); 4 a variant
does not fit in memory; otherwise a training run's own exit code (3 non-finite loss, 128 + N signal N, ...):
rerun the same command to continue.
"""
from __future__ import annotations

import argparse
import json
import statistics
import string
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..api.compare import (MATCHES, CompareError, Variant, budget_seconds, check_comparable, check_plan, find_run,
                           identity, load_variant, markdown, matched_steps, plan_dict, plot, predicted_step_seconds,
                           read_plan, read_run, resolve_vocab, run_name, summarise, variant_label, whole_split_loss)
from ..api.throughput import alternate, build_timing_trainer
from ..train.checkpoint import write_atomic_text
from ..train.rundir import RunDir
from .common import EXIT_USAGE, EXIT_WONT_FIT, fail, user_errors

LETTERS = string.ascii_lowercase
EVALS = "evals"           # <comparison>/evals/<run name>.json: each finished run's whole-split evaluation
RUNS = "runs"


class WontFitVariant(Exception):
    """A variant whose training's checks say it does not fit in memory (exit 4)."""


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m nanodecoder.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("blueprints", nargs="+", metavar="BLUEPRINT",
                   help="two or more blueprint files (or shipped names); the first is the reference")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a value of every variant, e.g. --set train.steps=200")
    for letter in LETTERS:
        p.add_argument(f"--set-{letter}", dest=f"set_{letter}", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE",
                       help=(f"override a value of variant {letter.upper()} only (after --set)"
                             + ("; --set-c, --set-d, ... for the next ones" if letter == "b" else ""))
                       if letter in "ab" else argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3; an interval needs 2 or more)")
    p.add_argument("--match", choices=MATCHES, default="steps",
                   help="what every variant gets the same of: steps (the first variant's train.steps, default), "
                        "tokens, flops (training FLOPs, analytic), or time (--budget of wall clock at each "
                        "variant's measured step time)")
    p.add_argument("--budget", metavar="DURATION",
                   help="with --match time: the wall-clock training time of each run, e.g. 90s, 10m "
                        "(default: the first variant's train.time_budget)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="the comparison folder (default <runs_dir>/compare/<A>-vs-<B>-<match>-<key>, the same "
                        "for the same command, so a rerun resumes)")
    p.add_argument("--calibration-rounds", type=int, default=5,
                   help="--match time: timed rounds per variant, alternating (default 5)")
    p.add_argument("--calibration-steps", type=int, default=5, help="--match time: steps per round (default 5)")
    p.add_argument("--calibration-warmup", type=int, default=3,
                   help="--match time: untimed steps per variant first (default 3)")
    return p.parse_args(argv)


def check_args(args) -> None:
    n = len(args.blueprints)
    if n < 2:
        raise CompareError(f"a comparison needs at least two variants, got {n} blueprint; give two or more (the "
                           "same one twice with --set-b KEY=VALUE compares one change)")
    if args.seeds < 1:
        raise CompareError(f"--seeds {args.seeds}: give 1 or more seeds per variant (2 or more for an interval)")
    extra = [f"--set-{c}" for c in LETTERS[n:] if getattr(args, f"set_{c}")]
    if extra:
        raise CompareError(f"{', '.join(extra)} given, but there are only {n} variants (A..{variant_label(n - 1)})")
    if args.budget is not None and args.match != "time":
        raise CompareError(f"--budget is the wall-clock time of --match time; with --match {args.match} every "
                           "variant trains a step count: leave --budget out or use --match time")
    if args.calibration_rounds < 1 or args.calibration_steps < 1 or args.calibration_warmup < 0:
        raise CompareError("need --calibration-rounds >= 1, --calibration-steps >= 1 and --calibration-warmup >= 0")


def load_variants(args) -> list[Variant]:
    """Every variant validated; the problems of all of them in one CompareError."""
    variants, problems = [], []
    for i, path in enumerate(args.blueprints):
        label = variant_label(i)
        own = getattr(args, f"set_{label.lower()}")
        try:
            variants.append(load_variant(label, path, [*args.overrides, *own]))
        except (*user_errors(), CompareError) as e:
            shown = f"{path}" + (f" --set {' '.join([*args.overrides, *own])}" if args.overrides or own else "")
            problems.append(f"variant {label} ({shown}): {e}")
    if problems:
        raise CompareError("\n".join(problems))
    return variants


# ---------------------------------------------------------------------------------------- training runs
#: runs ``python -m nanodecoder.run ARGV``; ``capture``: return its output too -> (exit code, output)
Launch = Callable[[list[str], bool], tuple[int, str]]


def launch_subprocess(argv: list[str], capture: bool = False) -> tuple[int, str]:
    """``python -m nanodecoder.run ARGV`` in a child process: its exit code and (``capture``) its output.

    Ctrl-C reaches the child too (the same process group), which saves a checkpoint and exits: it is waited
    for, never killed mid-save."""
    proc = subprocess.Popen([sys.executable, "-m", "nanodecoder.run", *argv],
                            **({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if capture else {}))
    while True:
        try:
            output, _ = proc.communicate()
            return proc.returncode, output or ""
        except KeyboardInterrupt:
            continue


def run_overrides(variant: Variant, folder: Path, seed: int, steps: int | None) -> list[str]:
    """The run's --set list: the variant's overrides, then the comparison's (seed, step count, no time budget,
    the run folder under the comparison's)."""
    fixed = [f"train.seed={seed}", "train.time_budget=null", f"logging.runs_dir={folder.resolve() / RUNS}",
             f"name={run_name(variant.label, variant.name, seed)}"]
    return [*variant.overrides, *fixed, *([f"train.steps={steps}"] if steps is not None else [])]


def training_checks(variants: list[Variant], folder: Path, seed: int, launch: Launch) -> None:
    """Training's own checks of every variant (``--dry-run``: the profile on this machine, the run folder, the
    data files, the memory plan), before anything trains: CompareError (or WontFit's exit 4) naming the variant."""
    for v in variants:
        code, output = launch([str(v.path), "--set", *run_overrides(v, folder, seed, None), "--dry-run"], True)
        if code == 0:
            continue
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error")] or lines[-3:]
        message = f"variant {v.describe()}: training's checks failed (exit {code}): {' / '.join(errors)}"
        if code == EXIT_WONT_FIT:
            raise WontFitVariant(message)
        raise CompareError(message)


def calibrate(variants: list[Variant], prep, rounds: int, steps: int, warmup: int) -> list[float]:
    """Each variant's seconds per optimizer step: the real trainers built side by side in this process, then
    ``rounds`` rounds of ``steps`` timed steps alternating between them (``api/throughput.py``); the median
    round of each."""
    pairs = [build_timing_trainer(v.spec, prep, warmup + rounds * steps) for v in variants]
    times = alternate(pairs, rounds=rounds, steps=steps, warmup=warmup)
    for _, runtime in pairs:
        runtime.close()
    return [statistics.median(t) for t in times]


def default_folder(variants: list[Variant], match: str, key: str) -> Path:
    names = "-vs-".join(v.name for v in variants[:3]) + ("-vs-more" if len(variants) > 3 else "")
    return Path(variants[0].spec.logging.runs_dir) / "compare" / f"{names}-{match}-{key[:8]}"


def evaluation(run_dir: Path, folder: Path, name: str) -> dict:
    """The run's whole-split evaluation, computed once and kept in ``<comparison>/evals/<name>.json`` (taken
    again when the run folder or its final checkpoint changed)."""
    f = folder / EVALS / f"{name}.json"
    latest = RunDir(run_dir).checkpoints.latest()
    latest = latest.name if latest is not None else None
    if f.is_file():
        try:
            kept = json.loads(f.read_text())
            if kept.get("run_dir") == str(run_dir.resolve()) and kept.get("checkpoint") == latest:
                return kept
        except ValueError:
            pass
    result = whole_split_loss(run_dir.resolve())
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(f, json.dumps(result, indent=2) + "\n")
    return result


def train_all(variants: list[Variant], steps: list[int], seeds: list[int], folder: Path, launch: Launch,
              say: Callable[[str], None] = print) -> tuple[int, dict]:
    """Train (or resume, or skip) every variant x seed in the alternating order; returns (exit code, results by
    (label, seed)); stops at the first run that fails, with its code."""
    results: dict[tuple[str, int], dict] = {}
    total = len(variants) * len(seeds)
    done = 0
    for seed in seeds:
        for v, n in zip(variants, steps):
            done += 1
            name = run_name(v.label, v.name, seed)
            state, run = find_run(folder / RUNS / name, n)
            tag = f"[{done}/{total}] {v.label} seed {seed}"
            if state == "done":
                say(f"{tag}: finished already ({run})")
            else:
                argv = [str(v.path), "--set", *run_overrides(v, folder, seed, n)]
                if state == "resume":
                    say(f"{tag}: resuming {run} ({n:,} steps)")
                    argv += ["--resume", str(run)]
                else:
                    say(f"{tag}: training {n:,} steps")
                code, _ = launch(argv, False)
                if code != 0:
                    say(f"{tag}: training exited with {code}; rerun this command to continue the comparison")
                    return code, results
                state, run = find_run(folder / RUNS / name, n)
                if state != "done":
                    say(f"{tag}: the run ended without its last step's checkpoint and evaluation; rerun this "
                        "command to continue it")
                    return 1, results
            results[(v.label, seed)] = read_run(run, evaluation(run, folder, name))
    return 0, results


# ---------------------------------------------------------------------------------------- the command
def compare(args, launch: Launch = launch_subprocess, calibrate_steps=calibrate,
            say: Callable[[str], None] = print, predict_steps=predicted_step_seconds) -> int:
    """The whole command (``main`` without the error handling); ``launch`` runs ``nanodecoder.run``,
    ``calibrate_steps(variants, prep, rounds, steps, warmup)`` gives each variant's seconds per step,
    ``predict_steps(variants)`` the throughput model's."""
    check_args(args)
    variants = load_variants(args)
    check_comparable(variants)
    first = variants[0]
    budget_s = None
    if args.match == "time":
        try:
            budget_s = budget_seconds(args.budget) if args.budget else first.spec.train.time_budget_s
        except ValueError as e:
            raise CompareError(str(e)) from None
        if budget_s is None:
            raise CompareError("--match time needs the wall-clock time of each run: give --budget (e.g. 90s) or a "
                               "train.time_budget in the first variant")
    else:
        budgeted = [v.label for v in variants if v.spec.train.time_budget]
        if budgeted:
            say(f"note: the train.time_budget of {', '.join(budgeted)} is set aside: --match {args.match} trains "
                f"step counts from A's train.steps ({first.spec.train.steps:,}); --match time matches the clock")
        if args.match == "steps":
            own = [f"{v.label} {v.spec.train.steps:,}" for v in variants[1:] if v.spec.train.steps != first.spec.train.steps]
            if own:
                say(f"note: --match steps gives every variant A's train.steps ({first.spec.train.steps:,}), not "
                    f"its own ({', '.join(own)})")
    prep = resolve_vocab(variants)
    key = identity(variants, args.match, budget_s)
    folder = Path(args.out) if args.out is not None else default_folder(variants, args.match, key)
    seeds = [first.spec.train.seed + i for i in range(args.seeds)]
    plan = read_plan(folder)
    if plan is not None:
        check_plan(plan, variants, args.match, budget_s, folder)
        say(f"comparison folder {folder}: continuing its plan")
    else:
        training_checks(variants, folder, seeds[0], launch)
        step_seconds = calibration = None
        if args.match == "time":
            say(f"measuring each variant's step time in this process, alternating ({args.calibration_rounds} rounds "
                f"of {args.calibration_steps} steps after {args.calibration_warmup} warm-up)")
            step_seconds = calibrate_steps(variants, prep, args.calibration_rounds, args.calibration_steps,
                                           args.calibration_warmup)
            calibration = {"rounds": args.calibration_rounds, "steps": args.calibration_steps,
                           "warmup": args.calibration_warmup}
        steps = matched_steps(variants, args.match, step_seconds=step_seconds, budget_s=budget_s)
        plan = plan_dict(variants, args.match, steps, budget_s=budget_s, step_seconds=step_seconds,
                         calibration=calibration, predicted_seconds=predict_steps(variants))
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic_text(folder / "plan.json", json.dumps(plan, indent=2) + "\n")
        say(f"comparison folder {folder}")
    for pv in plan["variants"]:
        measured = f", {1000 * pv['step_s_measured']:.1f} ms/step measured" if pv.get("step_s_measured") else ""
        if pv.get("step_s_predicted"):
            measured += f", {1000 * pv['step_s_predicted']:.1f} ms/step predicted"
        say(f"  {pv['label']} {pv['name']}: {pv['steps']:,} steps x {pv['tokens_per_step']:,} tokens, "
            f"{pv['flops']:.3g} training FLOPs{measured}")
    code, results = train_all(variants, [pv["steps"] for pv in plan["variants"]], seeds, folder, launch, say)
    if code != 0:
        return code
    summary = summarise(plan, results, seeds)
    summary["folder"] = str(folder)
    text = markdown(summary)
    write_atomic_text(folder / "comparison.md", text)
    write_atomic_text(folder / "comparison.json", json.dumps(summary, indent=2) + "\n")
    drawn = plot(summary, folder / "comparison.png")
    say("")
    say(text.rstrip())
    say(f"\nwrote {folder / 'comparison.md'}, comparison.json" + (", comparison.png" if drawn else ""))
    return 0


def main(argv: list[str] | None = None, launch: Launch = launch_subprocess, calibrate_steps=calibrate,
         predict_steps=predicted_step_seconds) -> int:
    """``launch``, ``calibrate_steps`` and ``predict_steps``: see :func:`compare` (a test runs the trainings in its
    own process and gives step times of its own)."""
    args = parse_args(argv)
    try:
        return compare(args, launch, calibrate_steps, predict_steps=predict_steps)
    except (*user_errors(), CompareError) as e:
        return fail(e, EXIT_USAGE)
    except WontFitVariant as e:
        return fail(e, EXIT_WONT_FIT)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the comparison", file=sys.stderr)
        return 130
