#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (6.5 minutes on one H200 on 2026-11-26, see
# docs/gpu_check_h200.md; budget about 2 minutes more for the machine's start):
#
#   bash tools/gpu_check.sh [OUT_DIR]          # logs and run metrics land in OUT_DIR
#
#   1. tests/runtime/test_cuda.py: CUDA paths against the CPU, float64 and eager
#      (fp32 and bf16 training, grouped_mm experts, compiled bf16, GPU -> CPU resume)
#   2. gpt2_124m.yaml, one optimizer step (12 x 1024 tokens x 40 accumulation) on random
#      tokens, bf16 eager and compiled: ms/step and MFU against the README's estimate
#   3. dense_gpt / moe_gpt on the profiles gpu (fp32 + TF32), gpu_mixed (bf16) and compiled,
#      300 steps each: final val losses and tokens/s side by side
#   4. the test suite with a GPU present (without the CPU-only torchrun / inductor tests)
#   5. with 2+ GPUs (NCCL): moe_gpt, 20 fp32 steps, under expert parallelism (EP 2 on 2 GPUs; with 4+ GPUs
#      also EP 2 x FSDP 2), its losses against one GPU's, and the sharded checkpoint resumed on one GPU
#
# GPU_CHECK_TEXT=FILE trains step 3 on a text file instead of the blueprints' corpus
# (whose tokenizer is trained first: a minute more).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-/tmp/gpu_check}}")
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NANODECODER_CACHE="$work/cache"
log="$out/gpu_check.log"

section() { echo; echo "=== $* ($(date +%T))" | tee -a "$log"; }
step() {   # step SECONDS CMD...: run with a time limit, output to the log and the terminal
    local limit=$1; shift
    echo "\$ $*" >>"$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "!!! exit $rc: $*" | tee -a "$log"
}

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability(), 'bf16', torch.cuda.is_bf16_supported())" 2>&1 | tee -a "$log"
python -c "from nanodecoder.runtime import RuntimeSpec, describe_plan
for p in ('gpu', 'gpu_mixed', 'multi_gpu_compile', 'fsdp'):
    print(describe_plan(RuntimeSpec(profile=p)))" 2>&1 | tee -a "$log"

section "1. CUDA tests"
step 240 python -m pytest -q -p no:cacheprovider tests/runtime/test_cuda.py -rA

section "2. gpt2_124m: one optimizer step, random tokens"
step 60 python tools/bench.py blueprints/gpt2_124m.yaml --synthetic --profile gpu_mixed --steps 3 --warmup 1
step 150 python tools/bench.py blueprints/gpt2_124m.yaml --synthetic --profile gpu_mixed --steps 3 --warmup 1 \
    --set runtime.compile=true

section "3. dense_gpt / moe_gpt on the GPU profiles, 300 steps"
data=()
if [ -n "${GPU_CHECK_TEXT:-}" ]; then
    data=("data.source={kind: text, path: $(realpath "$GPU_CHECK_TEXT"), val_fraction: 0.1}")
fi
for variant in "dense_gpt gpu" "dense_gpt gpu_mixed" "moe_gpt gpu_mixed" \
               "dense_gpt gpu_mixed compile" "moe_gpt gpu_mixed compile"; do
    set -- $variant
    name="$1-$2${3:+-compiled}"
    step 150 python -m nanodecoder.run "blueprints/$1.yaml" --profile "$2" --set train.steps=300 \
        train.eval_every=100 train.log_every=50 runtime.compile=$([ -n "${3:-}" ] && echo true || echo false) \
        "logging.runs_dir=$work/runs/$name" "${data[@]}"
done
python - "$work/runs" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
print(f"{'variant':32s} {'val loss':>9s} {'tokens/s':>10s} {'MFU':>6s}")
for m in sorted(Path(sys.argv[1]).glob("*/*/*/metrics.jsonl")):
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"][1:]       # the first includes compilation
    tok = sum(r.get("tokens_per_s", 0) for r in train) / max(len(train), 1)
    mfu = sum(r.get("mfu") or 0 for r in train) / max(len(train), 1)
    print(f"{m.parts[-4]:32s} {val[-1]['val_loss'] if val else float('nan'):9.4f} {tok:10,.0f} {mfu:6.1%}")
EOF
tar -C "$work" -czf "$out/runs.tgz" --exclude='*.safetensors' --exclude='*.pt' runs 2>/dev/null

section "4. the test suite with a GPU present (less the CPU-only torchrun and inductor tests)"
# The 'distributed' (gloo) and 'compile' (C++ inductor) tests are CPU-only and take most of the
# suite's time there: CI runs them; here they would not fit in the limit.
step 150 python -m pytest -q -p no:cacheprovider -m "not distributed and not compile" \
    --ignore=tests/runtime/test_cuda.py tests
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -ge 2 ]; then
    section "5. expert parallelism over NCCL ($ngpu GPUs): moe_gpt, 20 fp32 steps, against one GPU"
    ep=(--profile gpu --set train.steps=20 train.eval_every=10 train.checkpoint_every=10 train.log_every=1
        sample.enabled=false logging.progress=false runtime.precision=fp32 runtime.tf32=false)
    step 150 python -m nanodecoder.run blueprints/moe_gpt.yaml "${ep[@]}" "logging.runs_dir=$work/ep/one"
    step 150 python -m torch.distributed.run --nproc_per_node=2 -m nanodecoder.run blueprints/moe_gpt.yaml "${ep[@]}" \
        runtime.expert_parallel=2 "logging.runs_dir=$work/ep/ep2"
    if [ "$ngpu" -ge 4 ]; then
        step 150 python -m torch.distributed.run --nproc_per_node=4 -m nanodecoder.run blueprints/moe_gpt.yaml "${ep[@]}" \
            runtime.expert_parallel=2 runtime.data_parallel=fsdp "logging.runs_dir=$work/ep/ep2xfsdp2"
    fi
    for run in "$work"/ep/ep2*/*/*/; do              # each sharded checkpoint resumed on one GPU, 5 steps more
        step 120 python -m nanodecoder.run --resume "$run" --set train.steps=25 runtime.expert_parallel=1
    done
    python - "$work/ep" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
def rows(name):
    (m,) = Path(sys.argv[1], name).glob("*/*/metrics.jsonl")
    return [(r["step"], k, r[k]) for r in map(json.loads, m.read_text().splitlines())
            for k in ("loss", "val_loss", "grad_norm") if k in r and r["step"] <= 20]
one = rows("one")
for name in ("ep2", "ep2xfsdp2"):
    if Path(sys.argv[1], name).exists():
        got = rows(name)
        worst = max(abs(a[2] - b[2]) / abs(b[2]) for a, b in zip(got, one))
        print(f"{name}: {len(got)} rows against one GPU's {len(one)}, max relative difference {worst:.2e}")
EOF
fi
section "done"
