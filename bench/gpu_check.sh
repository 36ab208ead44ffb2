#!/usr/bin/env bash
# The GPU checks of #11 (docs/benchmarks.md), most telling first, in one call on a lent GPU:
#
#     bash bench/gpu_check.sh OUT [STEP ...]   # OUT/log, OUT/results.tgz; STEPs: only those
#
# Each step's results (results.md/json, profiles, its printed lines) are packed into
# OUT/results.tgz as soon as it ends, so a call cut short still returns what it finished.
# Full epochs: 540 long reviews as instructions for the 3B LoRA (68 steps of 8), 4 epochs
# of 500 for DistilBERT.
set -u
mkdir -p "${1:?usage: bash bench/gpu_check.sh OUT [STEP ...]}"
out=$(CDPATH= cd "$1" && pwd)
only=" ${*:2} "
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."  # python -m bench runs from the repository root
exec > >(tee -a "$out/log") 2>&1
logger=$!
work=$(mktemp -d)
# One compiler cache for every step, outside the steps' scratch (which is removed):
# the first compiled step (l3b-compile) pays a cold compile, as a user's first run
# does, and the later ones reuse its kernels instead of compiling them again.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
# When each graph began and ended compiling, and why each recompilation came, in the
# training processes' logs (kept below).
export PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles,dynamo
pack() {  # a new archive, then renamed: a kill while packing keeps the last one whole
    tar czf "$out/.results.tgz" -C "$work" . && mv "$out/.results.tgz" "$out/results.tgz"
}
wanted() { [ "$only" = "  " ] || [[ $only == *" $1 "* ]]; }
step() {  # NAME, a time limit in seconds, then python -m bench's flags
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    echo "=== $name: python -m bench $* ($(date -u +%T))"
    # A step cut short writes no results.md, and leaves its scratch (a 3B model, 7 GB):
    # its printed lines and its training processes' logs are kept, its scratch folder
    # removed. SIGKILL, to the step's whole process group: a SIGTERM'd training run
    # first finishes its step in flight, and one that was compiling held 14.7 GiB of the
    # GPU through the next steps (2026-11-27).
    mkdir -p "$work/tmp-$name"
    TMPDIR="$work/tmp-$name" timeout -s KILL "$limit" "$py" -m bench --out "$work/$name" \
        --note "$name" --keep-work "$@" 2>&1 | tee "$work/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} ($(date -u +%T))"
    mkdir -p "$work/$name/logs"
    find "$work/tmp-$name" -name '*.log' -size -20M -exec cp {} "$work/$name/logs/" \;
    rm -rf "$work/tmp-$name"
    pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# The machine's own bf16 peak, for MFU beside the datasheet's 989 TFLOP/s.
wanted peak && "$py" - <<'EOF' | tee "$work/peak.txt"
import torch
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    a @ b
end.record()
torch.cuda.synchronize()
print(f"bf16 8192^3 matmul: {2 * 8192**3 * 20 / start.elapsed_time(end) / 1e9:.0f} TFLOP/s "
      f"on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
pack

step l3b 240 --workloads gpu-openllama-3b --repeats 1
step dbert 150 --workloads gpu-distilbert --repeats 1
step l3b-b16 200 --workloads gpu-openllama-3b --repeats 1 --sides rawtune trainer-grouped \
    --batch-size 16
# --compile: a 3B run took over 150 s before its first step on an H100 (2026-11-27).
step l3b-compile 360 --workloads gpu-openllama-3b --repeats 1 --sides rawtune \
    --rawtune-arg=--compile
# A profile only (no timed run) of steps 6-8 of a compiled 3B rawtune run; the eager
# one's, from before the adapter-input lever, is bench/profile-h100-openllama-3b.txt.
step l3b-profile 240 --workloads gpu-openllama-3b --steps 10 --repeats 0 --sides rawtune \
    --rawtune-arg=--compile --profile
step dbert-compile 120 --workloads gpu-distilbert --repeats 1 --sides rawtune \
    --rawtune-arg=--compile
step l3b-b16-compile 300 --workloads gpu-openllama-3b --repeats 1 --sides rawtune \
    --batch-size 16 --rawtune-arg=--compile
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
echo "=== done ($(date -u +%T))"
exec >&- 2>&-
wait "$logger"  # until tee has written the last lines
