#!/usr/bin/env bash
# The one script to run when a GPU is lent (issue 23): every step under a deadline, everything written under $OUT,
# so a 10-minute command brings its numbers back even when a step hangs or the command is killed.
#
#   OUT=/tmp/out bash scripts/device_check.sh            # default budget 460 s: ends within 8 min
#   BUDGET_S=300 OUT=/tmp/out bash scripts/device_check.sh
#   DRY_RUN=1 OUT=/tmp/out bash scripts/device_check.sh  # print the plan and write nothing else (tested on CPU)
#
# Steps, in the order of what is most wanted (each capped, none started with less than 20 s left):
#   1. environment facts: GPU, driver, /dev/shm, cores, torch                    -> $OUT/env.txt
#   2. GPU augmentation ops and frames/s, host syncs per step on CUDA, the eager matrix for caformer_s18 and
#      vit_small (bf16)                                                          -> $OUT/report/gpu_report.json
#   3. 2-epoch demo training on the GPU, CPU then GPU augmentation, then GPU decoding (data.decode=gpu), and their
#      frames/s and data-wait side by side                     -> $OUT/demo_{cpu,gpu}_aug/, demo_gpu_decode/, decode_compare.txt
#   4. the data-wait part (real loader, 16 workers)                              -> $OUT/data_wait/gpu_report.json
#   5. compile cells while time remains                                          -> $OUT/compile/gpu_report.json
# $OUT/summary.txt: one line per step (exit status, seconds) and each report's last line.
set -uo pipefail

OUT=${OUT:?set OUT to the directory that comes back}
BUDGET_S=${BUDGET_S:-460}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
[ "$DRY_RUN" = 1 ] || : >"$SUMMARY"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME CAP_S LOG COMMAND...: run COMMAND under timeout min(CAP_S, time left), output to LOG, a summary line
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local remaining limit
    remaining=$(left)
    limit=$((cap < remaining ? cap : remaining))
    if [ "$DRY_RUN" = 1 ]; then
        echo "step $name: timeout ${cap}s: $*"
        return 0
    fi
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped (time budget: ${remaining}s left)" | tee -a "$SUMMARY"
        return 0
    fi
    local t0=$SECONDS rc=0
    echo "[$(($(date +%s) - START))s] $name (up to ${limit}s)" >&2
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s, last line: $(tail -n 1 "$log" 2>/dev/null)" | tee -a "$SUMMARY"
}

if [ "$DRY_RUN" != 1 ]; then
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "cores: $(nproc) (usable by this process: $($PY -c 'import os; print(len(os.sched_getaffinity(0)))'))"
        echo "/dev/shm: $(df -h /dev/shm 2>/dev/null | tail -n 1)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
        $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
        git log -1 --format='commit %H %s' 2>/dev/null
    } >"$OUT/env.txt" 2>&1
    echo "environment: $(head -c 2000 "$OUT/env.txt" | tr '\n' ';')" >>"$SUMMARY"
fi

step report 170 "$OUT/report.log" \
    $PY scripts/gpu_report.py --backbones caformer_s18,vit_small --precisions bf16-mixed --compile off \
    --parts augment,syncs,matrix --time-budget 120 --out "$OUT/report"

for aug in cpu gpu; do
    step "demo_${aug}_aug" 60 "$OUT/demo_${aug}_aug.log" \
        $PY -m surgenet_ssl.train trainer=gpu trainer.devices=1 trainer.max_epochs=2 data.augment_on=$aug \
        export.enabled=false hydra.run.dir="$OUT/demo_${aug}_aug"
done
# the same model with data.decode=gpu (JPEG bytes from the workers, nvJPEG in the step); decode_compare prints the
# last perf/images_per_s and perf/data_wait_fraction of the cpu / gpu-aug / gpu-decode demos (throughput callback)
step demo_gpu_decode 60 "$OUT/demo_gpu_decode.log" \
    $PY -m surgenet_ssl.train trainer=gpu trainer.devices=1 trainer.max_epochs=2 data.augment_on=gpu data.decode=gpu \
    export.enabled=false hydra.run.dir="$OUT/demo_gpu_decode"
step decode_compare 10 "$OUT/decode_compare.txt" \
    $PY scripts/perf_summary.py "$OUT/demo_cpu_aug" "$OUT/demo_gpu_aug" "$OUT/demo_gpu_decode"

step data_wait 90 "$OUT/data_wait.log" \
    $PY scripts/gpu_report.py --backbones caformer_s18 --parts data_wait --time-budget 60 --out "$OUT/data_wait"

# compile cells with what is left (gpu_report starts one only with >= 180 s of its own budget left)
step compile 400 "$OUT/compile.log" \
    $PY scripts/gpu_report.py --backbones caformer_s18,vit_small --precisions bf16-mixed --compile on \
    --parts matrix --time-budget $(($(left) - 10)) --out "$OUT/compile"

[ "$DRY_RUN" = 1 ] || echo "total: $(($(date +%s) - START)) s of a ${BUDGET_S} s budget" | tee -a "$SUMMARY"
