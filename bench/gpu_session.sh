#!/usr/bin/env bash
# The next GPU call, as one script: what docs/BENCHMARKS.md ("GPU training") still lacks, most wanted first.
#
# Here:   .venv/bin/python bench/gpu_train.py --prepare      (fills bench/.carry, ~31 MiB)
# There:  the device tool's `run` with carry ["bench/.carry"] and timeout_s 600:
#             bash bench/gpu_session.sh
#
# Each step writes $OUT/<name>.txt (the device tool brings $OUT back) and runs under what is left of
# BUDGET_S, so the call ends inside its limit with every finished step's output; a step that does not
# fit is skipped and says so. Row by row, gpu_train.py prints each configuration as it finishes.
set -uo pipefail

OUT=${OUT:-/tmp/gpu-session}
BUDGET_S=${BUDGET_S:-540}
PEAK=${PEAK_TFLOPS:-989}  # H200/H100 SXM dense bf16
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$SECONDS

step() {  # step NAME MIN_SECONDS COMMAND...: run COMMAND if MIN_SECONDS are left, with what is left
    local name=$1 need=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - started)))
    if ((left < need)); then
        echo "[session] $name skipped: ${left}s left, it needs about ${need}s" | tee -a "$OUT/session.txt"
        return
    fi
    echo "[session] $name: $* (limit ${left}s)" | tee -a "$OUT/session.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" >"$OUT/$name.txt" 2>&1
    echo "[session] $name ended with $? after $((SECONDS - t0))s" | tee -a "$OUT/session.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv >"$OUT/gpu.txt" 2>&1
date -u +"%Y-%m-%dT%H:%M:%SZ" >>"$OUT/gpu.txt"

# 1. The same-call baseline beside the two changes that need a GPU to be measured: no adapter dropout,
#    and the 4-bit base (bitsandbytes carried, never run on a GPU).
step train_1.7B_b16 200 python3 bench/gpu_train.py --peak-tflops "$PEAK" --sizes 1.7B --batch 16 \
    --configs project,project-no-dropout,project-4bit
# 2. Compilation: fewer, fused kernels for a host-bound step (compile time unknown).
step train_1.7B_b16_compiled 150 python3 bench/gpu_train.py --peak-tflops "$PEAK" --sizes 1.7B --batch 16 \
    --configs project-compiled
# 3. Without dropout the memory plan keeps activations at 32 sequences (with it, it recomputed).
step train_1.7B_b32_no_dropout 90 python3 bench/gpu_train.py --peak-tflops "$PEAK" --sizes 1.7B --batch 32 \
    --rows 1200 --steps 16 --configs project-no-dropout
# 4. Where a compiled step's time goes.
step profile_1.7B_compiled 90 python3 bench/gpu_profile.py --size 1.7B --compile --skip 12

echo "[session] done in $((SECONDS - started))s" | tee -a "$OUT/session.txt"
