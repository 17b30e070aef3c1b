#!/usr/bin/env bash
# The checks owed to the GPU after sessions without one (written in 35, run in 36: tests 164 s,
# moe ~90 s, decode ~100 s on one H200): the CUDA parity tests (every tests/test_ops_*.py and
# the engine's, "tests"), the small-T MoE-layer cells with the one-launch training route
# against the multi-kernel one and the peers in interleaved rounds ("moe"), and the served
# decode rate against an older tree, two rounds alternating ("decode"). The device tool brings
# back at most 8 files per call: pack OUT (tar) when running several steps at once.
#
#   STEPS="tests moe decode sampling" benchmarks/gpu_session.sh OUT [BASE_TREE]
#
# "sampling" (session 39): the batched sampler alone against the per-row chain it replaced and
# transformers' (benchmarks/sampling.py), and served decode greedy against sampled.
# STEPS: which steps to run (default the first three; split them over calls to stay within the
# device tool's per-call limit). OUT: where the logs and results go ($OUT on the device
# machine). BASE_TREE: a `git archive` of the commit to compare the served decode with
# (session 34's change is 84fa648, so c8e18ba), carried to the machine; without it the served
# decode runs on this tree alone. Each step logs to its own file and a failing step does not
# stop the next; OUT/steps.txt lists their exit codes.
set -u
OUT=${1:?usage: benchmarks/gpu_session.sh OUT [BASE_TREE]}
BASE=${2:-}
STEPS=${STEPS:-tests moe decode}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
[ -n "$BASE" ] && BASE=$(cd "$BASE" && pwd)
cd "$HERE"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step tests && { python -m pytest -p no:cacheprovider -o addopts= -n 8 -q --tb=short \
    tests/test_engine_cuda.py tests/test_ops_*.py > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" >> "$OUT/steps.txt"; }

step moe && { python benchmarks/moe_layer.py --shapes qwen3-30b-a3b ds-1.3b+moe128 mixtral-8x7b \
    --tokens 8 128 --impls moeflow minimal hf-grouped_mm moeflow-route_triton \
    --modes fwd+bwd --rounds 5 --out "$OUT/moe_layer" > "$OUT/moe_layer.log" 2>&1
    echo "moe_layer rounds: exit $?" >> "$OUT/steps.txt"; }

# The base tree runs this tree's decode_served.py (its order of timing: served steps before the
# profiler), copied in; the script runs in trees without GraphDecoder.held_state too.
[ -n "$BASE" ] && step decode && cp benchmarks/decode_served.py "$BASE/benchmarks/"
step decode && for round in 1 2; do
    if [ -n "$BASE" ]; then
        (cd "$BASE" && PYTHONPATH=. python benchmarks/decode_served.py --out "$OUT/decode_served" \
            --label "base$round" --cases 1:36 1:76 16:36 --between) \
            > "$OUT/decode_served_base$round.log" 2>&1
        echo "decode_served base $round: exit $?" >> "$OUT/steps.txt"
    fi
    python benchmarks/decode_served.py --out "$OUT/decode_served" --label "new$round" \
        --cases 1:36 1:76 16:36 --between > "$OUT/decode_served_new$round.log" 2>&1
    echo "decode_served new $round: exit $?" >> "$OUT/steps.txt"
done
# The sampler: alone against the per-row chain and transformers, then served decode greedy
# against sampled (temperature 0.8, top-k 40, top-p 0.95; temperature 0.8 alone), two rounds.
step sampling && { python benchmarks/sampling.py --out "$OUT/sampling" > "$OUT/sampling.log" 2>&1
    echo "sampling alone: exit $?" >> "$OUT/steps.txt"; }
step sampling && for round in 1 2; do
    for how in greedy 0.8:40:0.95 0.8:0:1; do
        flag=(); [ "$how" != greedy ] && flag=(--sampling "$how")
        python benchmarks/decode_served.py --out "$OUT/decode_sampled" --label "round$round" \
            --cases 1:36 16:36 "${flag[@]}" >> "$OUT/decode_sampled.log" 2>&1
        echo "decode_served $how round $round: exit $?" >> "$OUT/steps.txt"
    done
done
cat "$OUT/steps.txt"
