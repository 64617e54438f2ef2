#!/usr/bin/env bash
# What a session runs when a GPU is lent (the `device` tool: ~15 min of device time, at most 600 s per
# command). Two parts, one call each, or both in one; results in $OUT (the device tool's folder) or
# bench/out/gpu:
#
#   bash bench/gpu.sh check   # ~6 min: model core on the GPU against the CPU (bench/device_check.py), then
#                             # step times of cd / AutoCDSR / AutoCDSR⁺ in fp32 and bf16 (bench/step_time.py)
#   bash bench/gpu.sh train   # ~9 min: KuaiRand-1K, SASRec, cd then cd+autocdsr at length 800, batch 128
#                             # (bench/device_train.py); needs data/kuairand1k/sequences carried along
#   bash bench/gpu.sh lease   # both in one call of at most LEASE_S (default 570) s, for a 15-minute lease:
#                             # the packing-plan and step timings first on the quiet GPU (bench/ib_plan.py,
#                             # bench/step_time.py), then device_check alongside one
#                             # training process per method in METHODS (default cd cd+autocdsr
#                             # cd+autocdsr_plus), each bounded by train.max_minutes; every file is packed
#                             # into $OUT/lease.tgz (a call brings back at most 8 files); TIMING=0 skips
#                             # the step timings (the training then gets their ~3 min)
#
# `train` and `lease` pass further KEY=VALUE arguments on as config overrides; BACKBONE=bert4rec trains
# BERT4Rec instead of SASRec (conf/train/kuairand1k-$BACKBONE.yaml), SEED=N (lease) another seed.
# STEP_ARGS adds flags to the step timings, e.g. AutoCDSR⁺ with coarser packed-row buckets (fewer kernel
# launches): STEP_ARGS="--ib-bucket-ratio 2 --ib-short-row 64" bash bench/gpu.sh lease model.ib_bucket_ratio=2
# model.ib_short_row=64
# DEVICE=cpu runs any part on the CPU, a dry run:
#   DEVICE=cpu STEPS=20 DATA=data/quickstart/sequences bash bench/gpu.sh train eval.num_negatives=100
# Only torch, numpy, pyarrow, pandas, pyyaml and tqdm are needed (the device image has them; Ray, MLflow and
# Spark are not). Every part has its own time limit so that one hang cannot eat the lease. Exit status: the
# correctness check's (1 if any check failed) for `check`, device_train's for `train`, 1 for `lease` if any
# training process failed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
shift $(($# > 0 ? 1 : 0))
out=${OUT:-bench/out/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.txt"

# step times in fp32 and bf16 at the CPU table's two shapes and the paper's Table 4 one (KuaiRand: 128 x 800)
# $1: time limit per precision (s), $2: timed rounds, $3: folder for step_time_{fp32,bf16}.log
timings() {
    local precision amp
    for precision in fp32 bf16; do
        amp=()
        [ "$precision" = bf16 ] && amp=(--amp)
        # shellcheck disable=SC2086  # STEP_ARGS is a list of flags, split on purpose
        timeout "$1" "$py" bench/step_time.py --device "${DEVICE:-cuda}" "${amp[@]}" ${STEP_ARGS:-} \
            --shapes 16x800 128x200 128x800 --rounds "$2" --update-every 10 1 2>&1 | tee "$3/step_time_$precision.log"
    done
}

# the KuaiRand training that `train` and `lease` run: the paper's model, batch, length, sampled-softmax training
# and 50,000-negative evaluation (conf/train); steps capped (STEPS, default 3,000) to fit the lease,
# validation on the first 1,024 validation sequences
data=${DATA:-data/kuairand1k/sequences}
config="conf/train/kuairand1k-${BACKBONE:-sasrec}.yaml"
settings=("train.max_steps=${STEPS:-3000}" train.warmup_steps=300 train.eval_every=500 eval.max_val_sequences=1024)

case "$mode" in
check)
    timeout 100 "$py" bench/device_check.py --device "${DEVICE:-cuda}" --out "$out" 2>&1 | tee "$out/device_check.log"
    status=${PIPESTATUS[0]}
    timeout 60 "$py" bench/ib_plan.py --device "${DEVICE:-cuda}" 2>&1 | tee "$out/ib_plan.log"
    timings 200 12 "$out"
    ;;
train)
    timeout 560 "$py" bench/device_train.py --data "$data" --config "$config" --methods cd cd+autocdsr --seeds 0 \
        --device "${DEVICE:-cuda}" --out "$out" --budget-s 300 --set "${settings[@]}" "$@" 2>&1 |
        tee "$out/device_train.log"
    status=${PIPESTATUS[0]}
    ;;
lease)
    budget=${LEASE_S:-570}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # four processes share the 16 cores
    t0=$SECONDS
    work=$(mktemp -d)
    trap 'cp "$out/nvidia-smi.txt" "$work/" 2>/dev/null; tar czf "$out/lease.tgz" -C "$work" .; rm -rf "$work"' EXIT
    # AutoCDSR⁺'s packing plan: host time in the encoder against in the data path (~20 s, quiet GPU)
    timeout 60 "$py" bench/ib_plan.py --device "${DEVICE:-cuda}" --data "$data" >"$work/ib_plan.log" 2>&1
    [ "${TIMING:-1}" = 0 ] || timings 100 10 "$work"
    # what is left, less 120 s for the last validation, the test evaluation and packing, is each run's budget
    left=$((budget - (SECONDS - t0)))
    minutes=$(awk -v s="$left" 'BEGIN { m = (s - 120) / 60; printf "%.2f", (m < 0.5 ? 0.5 : m) }')
    echo "$left s left: training for at most $minutes min per run, all runs at once" | tee "$work/lease.log"
    timeout $((left - 15)) "$py" bench/device_check.py --device "${DEVICE:-cuda}" --out "$work" \
        >"$work/device_check.log" 2>&1 &
    pids=()
    for method in ${METHODS:-cd cd+autocdsr cd+autocdsr_plus}; do
        name=${method//+/_}
        timeout $((left - 15)) "$py" bench/device_train.py --data "$data" --config "$config" --methods "$method" \
            --seeds "${SEED:-0}" --device "${DEVICE:-cuda}" --out "$work/$name" \
            --set "${settings[@]}" "train.max_minutes=$minutes" "$@" >"$work/train_$name.log" 2>&1 &
        pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    wait
    tail -n 3 "$work"/train_*.log "$work/device_check.log" | tee -a "$work/lease.log"
    echo "lease: $((SECONDS - t0)) s" | tee -a "$work/lease.log"
    ;;
*)
    echo "usage: bash bench/gpu.sh check|train|lease" >&2
    exit 2
    ;;
esac
exit "$status"
