"""Sizes that are valid YAML but absurd (10**5 .. 10**18 for every size field, alone and combined): the dry run,
training and the parameter counter end with one message -- exit 4 (the plan does not fit) or exit 2 (a size no
machine can build, naming the key) -- in well under a second of work, without building the model or allocating
what the sizes describe; and the plan's per-layer sums do not grow with n_layers (``ModelSpec.layer_groups``)."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from trainhelpers import make_corpus, subprocess_env  # noqa: E402

from nanodecoder.cli import param_count  # noqa: E402
from nanodecoder.api import run as run_api  # noqa: E402
from nanodecoder.cli import run as run_cli  # noqa: E402
from nanodecoder.model import plan as P  # noqa: E402
from nanodecoder.model.spec import LayerRange, OverrideSpec, build_model_spec, layer_coverage  # noqa: E402
from nanodecoder.runtime import MEMORY_ENV  # noqa: E402

BUDGET = "64MiB"          # the base models need well under 1 MiB; every absurd size needs more than this
SIZES = (10 ** 5, 10 ** 7, 10 ** 9, 10 ** 18)
ATTENTION = {"kind": "causal", "n_heads": 2, "head_dim": 16}
DENSE_FIELDS = ("model.d_model", "model.n_layers", "model.context_length", "model.vocab_size",
                "model.block.attention.n_heads", "model.block.attention.n_kv_heads", "model.block.attention.head_dim",
                "model.block.mlp.hidden_size", "train.batch_size")
MOE_FIELDS = ("model.block.mlp.n_experts", "model.block.mlp.expert_hidden", "model.block.mlp.top_k",
              "model.block.mlp.n_shared_experts", "model.d_model", "model.n_layers", "train.batch_size")
MAX_RSS_MB = 500
HANG_S = 60                # hang catcher only: a case takes milliseconds in-process, ~2 s as a subprocess


def base_raw(tmp: Path, moe: bool = False) -> dict:
    """A tiny model with no data section (planned offline), a windowed override every 2nd layer."""
    mlp = ({"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32, "n_shared_experts": 1} if moe
           else {"kind": "gelu", "hidden_size": 64})
    return {"name": "absurd",
            "model": {"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 2,
                      "block": {"attention": ATTENTION, "mlp": mlp},
                      "overrides": [{"layers": {"start": 1, "every": 2}, "attention": {**ATTENTION, "window": 8}}]},
            "train": {"steps": 10, "batch_size": 4},
            "logging": {"runs_dir": str(tmp / "runs"), "progress": False},
            "runtime": {"profile": "cpu"}}


def write(tmp: Path, raw: dict, name: str = "absurd.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextlib.contextmanager
def hang_catcher(seconds: float = HANG_S):
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    with hang_catcher():
        try:
            rc = main(argv)
        except SystemExit as e:            # argparse
            rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_message(rc: int, out: str, err: str, sets: list[str], planned: bool = True) -> None:
    """Exit 2 or 4 with one error (the dry run prints the plan first; training says nothing was built)."""
    assert rc in (2, 4), (sets, rc, err[-500:])
    assert err.count("error:") == 1 and "Traceback" not in err, (sets, err[-500:])
    if rc == 4:
        assert err.startswith("error: the run does not fit in memory"), (sets, err)
        assert "does not fit: the plan needs" in out if planned else "Nothing was built" in err, (sets, out, err)
    else:
        assert "model." in err or "train." in err, (sets, err)     # names the key


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything builds the model (the plan is arithmetic on the spec)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(run_api, "build_model", refuse)
    monkeypatch.setattr("nanodecoder.model.builder.build_model", refuse)


def cases() -> list[tuple[bool, list[str]]]:
    """Every field at every size alone, every field at once, and random combinations (seeded)."""
    out = [(moe, [f"{key}={v}"]) for moe, fields in ((False, DENSE_FIELDS), (True, MOE_FIELDS))
           for key in fields for v in SIZES]
    out += [(moe, [f"{key}={v}" for key in fields]) for moe, fields in ((False, DENSE_FIELDS), (True, MOE_FIELDS))
            for v in SIZES]
    rng = random.Random(0)
    for _ in range(60):
        moe = rng.random() < 0.5
        fields = MOE_FIELDS if moe else DENSE_FIELDS
        out.append((moe, [f"{key}={rng.choice(SIZES)}" for key in rng.sample(fields, rng.randint(2, 4))]))
    return out


def test_the_base_models_fit_the_budget(tmp_path, capsys, monkeypatch, no_build):
    """The control: without an absurd size the same dry runs exit 0 under the budget the cases below use."""
    monkeypatch.setenv(MEMORY_ENV, BUDGET)
    for moe in (False, True):
        rc, out, err = cli(run_cli.main, [str(write(tmp_path, base_raw(tmp_path, moe))), "--dry-run"], capsys)
        assert rc == 0 and "fits: " in out, err


def test_every_absurd_size_ends_the_dry_run_with_one_message_at_once(tmp_path, capsys, monkeypatch, no_build):
    monkeypatch.setenv(MEMORY_ENV, BUDGET)
    paths = {moe: write(tmp_path, base_raw(tmp_path, moe), f"absurd_{moe}.yaml") for moe in (False, True)}
    codes = Counter()
    start = time.perf_counter()
    for moe, sets in cases():
        rc, out, err = cli(run_cli.main, [str(paths[moe]), "--dry-run", "--set", *sets], capsys)
        assert_one_message(rc, out, err, sets)
        codes[rc] += 1
    assert codes[4] > codes[2] > 0           # most plan and do not fit; the unbuildable are refused as input
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sets, code, says", [
    (["model.d_model=1000000000000000000"], 2, ("model.block.attention (line", "causal attention would hold")),
    (["model.d_model=1000000000"], 4, ("does not fit",)),            # head_dim 16: 4 x 16 x 2 x 10**9 weights
    (["model.vocab_size=1000000000000000000"], 2, ("model.vocab_size", "the token embedding would hold")),
    (["model.context_length=1000000000000000000"], 2, ("model.positional", "learned positions would hold")),
    (["model.block.mlp.hidden_size=1000000000000000000"], 2, ("model.block.mlp", "gelu mlp would hold")),
    (["model.overrides=[{layers: [0], attention: {kind: causal, n_heads: 2, head_dim: 1000000000000000000}}]"], 2,
     ("model.overrides[0].attention", "causal attention would hold")),
    (["model.n_layers=1000000000"], 4, ("does not fit",)),
])
def test_which_sizes_are_bad_input_and_which_do_not_fit(tmp_path, capsys, monkeypatch, no_build, sets, code, says):
    """Exit 2 where a weight tensor would pass the 2**63 - 1 bytes torch can hold (no machine can build it), exit 4
    for anything smaller."""
    monkeypatch.setenv(MEMORY_ENV, BUDGET)
    rc, out, err = cli(run_cli.main, [str(write(tmp_path, base_raw(tmp_path))), "--dry-run", "--set", *sets], capsys)
    assert rc == code and all(part in out + err for part in says), err
    if code == 2:
        assert "past the 2**63 - 1 bytes torch can index (no machine can build it); lower " in err


def test_the_last_buildable_size_plans_and_the_next_is_refused(tmp_path, capsys, monkeypatch, no_build):
    """The limit is torch's own: a weight of 2**61 - 1 fp32 numbers can exist, one of 2**61 cannot."""
    import torch
    torch.empty(2 ** 61 - 1, dtype=torch.float32, device="meta")
    with pytest.raises(RuntimeError, match="overflow"):
        torch.empty(2 ** 61, dtype=torch.float32, device="meta")
    monkeypatch.setenv(MEMORY_ENV, BUDGET)
    bp = str(write(tmp_path, base_raw(tmp_path)))          # d_model 32: embedding = vocab_size x 32 weights
    assert cli(run_cli.main, [bp, "--dry-run", "--set", f"model.vocab_size={2 ** 56 - 1}"], capsys)[0] == 4
    rc, _, err = cli(run_cli.main, [bp, "--dry-run", "--set", f"model.vocab_size={2 ** 56}"], capsys)
    assert rc == 2 and "model.vocab_size" in err


UNBUILDABLE = f"model.d_model={10 ** 18}"


def test_training_refuses_absurd_sizes_before_building_or_writing(tmp_path, capsys, monkeypatch, no_build):
    monkeypatch.setenv(MEMORY_ENV, BUDGET)
    monkeypatch.setenv("NANODECODER_CACHE", str(tmp_path / "cache"))
    make_corpus(tmp_path / "corpus.txt", n_words=400)
    raw = base_raw(tmp_path)
    raw["data"] = {"source": {"kind": "text", "path": "corpus.txt"}, "tokenizer": {"kind": "byte"}}
    raw["model"]["vocab_size"] = 256
    bp = str(write(tmp_path, raw))
    for sets in (["model.n_layers=100000"], ["model.d_model=100000000"], ["train.batch_size=1000000000"],
                 ["model.vocab_size=auto", "model.n_layers=1000000000"],
                 ["model.d_model=1000000000"], [UNBUILDABLE], [UNBUILDABLE, "runtime.check_memory=false"]):
        rc, out, err = cli(run_cli.main, [bp, "--set", *sets], capsys)
        assert_one_message(rc, out, err, sets, planned=False)
        assert rc == (2 if UNBUILDABLE in sets else 4), (sets, err)
        assert "tokenize" not in err          # refused before the data is prepared (the byte vocabulary is known)
    assert not (tmp_path / "runs").exists()


def test_param_count_plans_absurd_sizes_and_refuses_the_unbuildable(tmp_path, capsys):
    bp = str(write(tmp_path, base_raw(tmp_path, moe=True)))
    for sets in (["model.n_layers=1000000000"], ["model.block.mlp.n_experts=1000000000", "train.batch_size=100000"],
                 ["model.d_model=1000000000", "model.context_length=1000000000"]):
        rc, out, err = cli(param_count.main, [bp, "--set", *sets, "--world-size", "4096"], capsys)
        assert rc == 0 and "training memory per device" in out and not err, (sets, err)
    rc, out, err = cli(param_count.main, [bp, "--json", "--set", f"model.block.mlp.expert_hidden={10 ** 18}"], capsys)
    assert rc == 2 and err.count("error:") == 1 and "model.block.mlp" in err and "Traceback" not in err


# ------------------------------------------------------------------ the reported reproductions, as processes
#: Runs ``python -m nanodecoder.run`` and, at exit, writes the process's own peak resident memory (kB): the
#: kernel's VmHWM of the process after exec. (``ru_maxrss`` from wait4 would also count the pages of the pytest
#: process it was forked from, hundreds of MB late in a full test run.)
MEASURED = """import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    with open('/proc/self/status') as f:
        kb = next(line.split()[1] for line in f if line.startswith('VmHWM'))
    with open(out, 'w') as f:
        f.write(kb)
atexit.register(peak)
sys.argv[0] = 'nanodecoder.run'
runpy.run_module('nanodecoder.run', run_name='__main__')
"""


def run_measured(argv: list[str], cwd: Path) -> tuple[int, str, str, float, float]:
    """``(exit code, stdout, stderr, seconds, peak resident MB)`` of ``python -m nanodecoder.run ARGV``."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to read a process's own peak memory")
    out_f, err_f, peak_f = cwd / "out.txt", cwd / "err.txt", cwd / "peak_kb.txt"
    start = time.perf_counter()
    with open(out_f, "w") as out, open(err_f, "w") as err:
        proc = subprocess.run([sys.executable, "-c", MEASURED, str(peak_f), *argv], cwd=cwd, stdout=out, stderr=err,
                              env=subprocess_env(cwd), timeout=HANG_S)
    return (proc.returncode, out_f.read_text(), err_f.read_text(), time.perf_counter() - start,
            int(peak_f.read_text()) / 1024)


@pytest.mark.parametrize("sets, code", [
    (["model.d_model=1000000000"], 2),       # was: RuntimeError "Storage size calculation overflowed" (a traceback)
    (["model.n_layers=100000"], 4),          # was: the plan, then > 100 s at 3.1 GB building 100000 meta blocks
    (["model.d_model=100000000"], 4),        # was: the plan's norm probe allocating a 10**8-wide LayerNorm
])
def test_the_reported_dry_runs_exit_at_once_in_little_memory(tmp_path, sets, code):
    rc, out, err, seconds, rss = run_measured(
        ["nanogpt_cpu_char", "--dry-run", "--set", "data.tokenizer={kind: byte}", *sets], tmp_path)
    assert rc == code, err[-2000:]
    assert err.count("error:") == 1 and "Traceback" not in err
    assert rss < MAX_RSS_MB, f"peak resident {rss:.0f} MB"
    if code == 4:
        assert "does not fit" in out and "component" in out
    else:
        assert "model.block.attention" in err and "lower model.d_model" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ layer groups: blocks counted without a list
def brute_coverage(overrides, n: int) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    for i in range(n):
        key = tuple(j for j, ov in enumerate(overrides) if i in ov.indices(n))
        out[key] = out.get(key, 0) + 1
    return out


def random_override(rng: random.Random, n: int) -> OverrideSpec:
    if rng.random() < 0.3:
        return OverrideSpec(layers=tuple(rng.randrange(n + 2) for _ in range(rng.randint(1, 4))))
    start = rng.randrange(n + 1)
    stop = rng.choice([None, rng.randrange(n + 3)])
    return OverrideSpec(layers=LayerRange(start=start, stop=stop, every=rng.randint(1, 7)))


def test_layer_coverage_counts_what_a_walk_over_every_layer_counts():
    rng = random.Random(1)
    for _ in range(400):
        n = rng.randint(1, 80)
        overrides = tuple(random_override(rng, n) for _ in range(rng.randint(0, 4)))
        got = layer_coverage(overrides, n)
        want = brute_coverage(overrides, n)
        assert list(got.items()) == list(want.items()), (n, overrides)   # the same counts, in first-layer order


def test_layer_groups_are_the_blocks_counted_and_plan_a_billion_layers_at_once():
    model = {"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 12,
             "block": {"attention": ATTENTION, "mlp": {"kind": "gelu"}},
             "overrides": [{"layers": [0, 1, 2], "mlp": {"kind": "swiglu"}},
                           {"layers": {"start": 1, "every": 2}, "attention": {**ATTENTION, "window": 4}},
                           {"layers": {"start": 4, "stop": 10, "every": 3}, "mlp": {"kind": "relu2"}}]}
    spec = build_model_spec(model)
    firsts: list = []
    for b in spec.blocks:
        if b not in firsts:
            firsts.append(b)
    assert [(b, spec.blocks.count(b)) for b in firsts] == [g for g in spec.layer_groups]
    huge = build_model_spec({**model, "n_layers": 10 ** 9, "overrides": model["overrides"][:2]})
    with hang_catcher():                         # milliseconds (a walk over the layers: minutes, gigabytes)
        planned = P.plan(huge, P.Setting(context=16, batch=10 ** 9))
        planned.memory(True).total, planned.memory(False).total, planned.kv_cache_per_sequence
    assert sum(n for _, n in huge.layer_groups) == 10 ** 9 and len(huge.layer_groups) == 4
    # layers from 4 on alternate a plain and a windowed block: the count of 10**9 layers follows from the counts
    # of 4 and 6 layers (which tests/model/test_plan.py checks against built models)
    four, six = (P.param_report(build_model_spec({**model, "n_layers": n, "overrides": model["overrides"][:2]}))
                 for n in (4, 6))
    assert planned.params.total == four.total + (10 ** 9 - 4) // 2 * (six.total - four.total)


def test_the_norm_probe_allocates_no_width_and_measures_what_the_real_width_saves():
    """Extended from widths 8 and 16, the bytes equal a measurement at the real width (linear in the width)."""
    spec = build_model_spec({"vocab_size": 64, "context_length": 16, "d_model": 96, "n_layers": 1,
                             "block": {"norm": {"kind": "layernorm"}, "attention": ATTENTION, "mlp": {"kind": "gelu"}}})
    import torch
    norm = spec.block.norm
    module = norm.build()
    from nanodecoder.components.contracts import saved_storages
    seen, out = saved_storages(module, torch.randn(2, 96, requires_grad=True), skip=list(module.parameters()))
    seen.pop(out.untyped_storage().data_ptr(), None)
    assert norm.saved_bytes_per_token() == pytest.approx(sum(seen.values()) / 2)
    import dataclasses
    with hang_catcher(10):
        wide = dataclasses.replace(norm, dim=10 ** 15).saved_bytes_per_token()   # 4 PB of weights if built
    assert wide == pytest.approx(norm.saved_bytes_per_token() + (10 ** 15 - 96) * 4)
