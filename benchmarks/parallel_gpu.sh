#!/usr/bin/env bash
# The expert-parallel GPU session on one 4-GPU host (recorded in benchmarks/results/parallel_*):
#   NCCL equality (2 GPUs), single-GPU throughput + MFU, EP weak scaling 1 -> 2 -> 4 with the
#   all-to-all bandwidth next to NCCL's.  Usage: OUT=dir benchmarks/parallel_gpu.sh
# Phase A runs the 1-GPU and the 2-GPU measurements on disjoint GPUs at the same time.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT"
B=${MICRO_BATCH:-4}
T=${PHASE_TIMEOUT:-150}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1

CUDA_VISIBLE_DEVICES=0 timeout "$T" python3 benchmarks/train_throughput.py --micro-batch "$B" \
    --out "$OUT/single.json" > "$OUT/single.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout "$T" torchrun --nproc-per-node 2 --master-port 29611 \
    benchmarks/train_throughput.py --ep 2 --micro-batch "$B" --a2a --out "$OUT/ep2.json" \
    > "$OUT/ep2.log" 2>&1 &
wait

CUDA_VISIBLE_DEVICES=0,1 timeout 240 torchrun --nproc-per-node 2 --master-port 29612 \
    benchmarks/parallel_equality.py --out "$OUT/equality.json" > "$OUT/equality.log" 2>&1

timeout "$T" torchrun --nproc-per-node 4 --master-port 29613 benchmarks/train_throughput.py \
    --ep 4 --micro-batch "$B" --a2a --out "$OUT/ep4.json" > "$OUT/ep4.log" 2>&1

for f in gpus.txt single.log ep2.log equality.log ep4.log; do
    echo "===== $f"; head -c 20000 "$OUT/$f"
done > "$OUT/all.log"
rm -f "$OUT"/single.log "$OUT"/ep2.log "$OUT"/equality.log "$OUT"/ep4.log "$OUT"/gpus.txt
