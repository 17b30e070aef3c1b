#!/usr/bin/env bash
# The expert-parallel GPU session on one host with 2 or 4 GPUs (recorded in benchmarks/results/):
#   single-GPU throughput + MFU, NCCL equality (2 and 4 GPUs), EP weak scaling 1 -> 2 (-> 4)
#   with the all-to-all bandwidth next to NCCL's.  Usage: OUT=dir benchmarks/parallel_gpu.sh
# With GPU_TESTS=1 the CUDA parity tests (kernels, engine) run on the second GPU while the
# single-GPU measurement runs on the first.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT"
B=${MICRO_BATCH:-4}
T=${PHASE_TIMEOUT:-150}
N=$(nvidia-smi --list-gpus | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1

if [ "${GPU_TESTS:-0}" = 1 ]; then
    (CUDA_VISIBLE_DEVICES=1 timeout 180 python3 -m pytest -q -p no:cacheprovider \
        tests/test_ops_routing.py tests/test_ops_permute.py tests/test_ops_grouped_mlp.py \
        tests/test_ops_moe_layer.py tests/test_engine_cuda.py > "$OUT/gpu_tests.log" 2>&1
     echo "rc=$?" >> "$OUT/gpu_tests.log") &
fi
CUDA_VISIBLE_DEVICES=0 timeout "$T" python3 benchmarks/train_throughput.py --micro-batch "$B" \
    --out "$OUT/single.json" > "$OUT/single.log" 2>&1
wait

CUDA_VISIBLE_DEVICES=0,1 timeout 170 torchrun --nproc-per-node 2 --master-port 29612 \
    benchmarks/parallel_equality.py --watchdog 150 --out "$OUT/equality.json" \
    > "$OUT/equality.log" 2>&1

CUDA_VISIBLE_DEVICES=0,1 timeout "$T" torchrun --nproc-per-node 2 --master-port 29611 \
    benchmarks/train_throughput.py --ep 2 --micro-batch "$B" --a2a --out "$OUT/ep2.json" \
    > "$OUT/ep2.log" 2>&1

if [ "$N" -ge 4 ]; then
    timeout 170 torchrun --nproc-per-node 4 --master-port 29614 benchmarks/parallel_equality.py \
        --watchdog 150 --out "$OUT/equality4.json" > "$OUT/equality4.log" 2>&1
    timeout "$T" torchrun --nproc-per-node 4 --master-port 29613 \
        benchmarks/train_throughput.py --ep 4 --micro-batch "$B" --a2a --out "$OUT/ep4.json" \
        > "$OUT/ep4.log" 2>&1
fi

for f in gpus.txt single.log equality.log ep2.log equality4.log ep4.log; do
    [ -f "$OUT/$f" ] && { echo "===== $f"; head -c 20000 "$OUT/$f"; }
done > "$OUT/all.log"
rm -f "$OUT"/single.log "$OUT"/ep2.log "$OUT"/equality.log "$OUT"/equality4.log "$OUT"/ep4.log \
      "$OUT"/gpus.txt
