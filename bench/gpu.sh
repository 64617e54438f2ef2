#!/usr/bin/env bash
# The checks a session runs when a GPU is lent (the `device` tool, ~10 min of its 15): correctness of the
# model core on the GPU against the CPU, then step times of cd / AutoCDSR / AutoCDSR⁺ in fp32 and bf16.
#
#   bash bench/gpu.sh            # results in $OUT (the device tool's folder) or bench/out/gpu
#
# Needs only torch, numpy, pyarrow, pandas, pyyaml and tqdm (the device image has them; Ray, MLflow and
# Spark are not needed). Each part has its own time limit so that one hang cannot eat the lease. Exit
# status: that of the correctness check (1 if any check failed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
timeout 120 "$py" bench/device_check.py --device cuda --out "$out" 2>&1 | tee "$out/device_check.log"
status=${PIPESTATUS[0]}
# the paper's Table 4 shape (KuaiRand: batch 128, length 800) and the CPU table's two
shapes=(16x800 128x200 128x800)
timeout 220 "$py" bench/step_time.py --device cuda --shapes "${shapes[@]}" --rounds 20 --update-every 10 1 \
    2>&1 | tee "$out/step_time_fp32.log"
timeout 220 "$py" bench/step_time.py --device cuda --amp --shapes "${shapes[@]}" --rounds 20 \
    --update-every 10 1 2>&1 | tee "$out/step_time_bf16.log"
exit "$status"
