#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU: the base pretraining step (compiled, bf16) with its samples/s,
# MFU, peak memory, compile time and graphs; the ITC step against Hugging Face's CLIPModel; a short base run
# on the shapes world. The numbers go to out-gpu/ (*.json and the logs); the README quotes them.
#
#     bash gpu_check.sh            # BATCH=128 bash gpu_check.sh: another batch per GPU
set -uo pipefail
cd "$(dirname "$0")"
out=out-gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
batch=${BATCH:-160}
status=0
run() {  # name, seconds, command...: a step that fails or runs out of time is reported, and the rest still run
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || { echo "== $name failed (exit $rc; 124: out of time), log in $out/$name.log"; status=1; }
}
run bench-base 180 python bench.py --config base --batch_size="$batch" --compile=regional --dtype=bfloat16 \
    --steps=20 --json "$out/bench-base.json"
run bench-vs-hf 90 python bench.py --config base --vs hf --batch_size="$batch" --compile=regional \
    --dtype=bfloat16 --steps=20 --json "$out/bench-vs-hf.json"
run train-base 210 python train.py --config base --batch_size="$batch" --max_iters=40 --warmup_iters=5 \
    --eval_interval=1000000 --out_dir="$out/train-base" --data_dir="$out/data" --n_train=4096 --n_web=512 \
    --n_val=256 --n_test=256 --n_novel_train=64 --n_novel_val=32 --n_multi_train=64 --n_multi_val=16
exit $status
