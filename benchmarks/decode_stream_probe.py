"""How fast can programs stream a batch-1 decode's expert weights? A probe of tile shape,
program count and weight layout, to choose the decode expert kernel's decomposition.

At batch 1 of Qwen3-30B-A3B the expert MLP reads 8 experts' weights (50 MB of gate|up, 25 MB of
down) and nothing else of size, so its time is bytes over the rate its programs reach. The up
kernel reaches ~3.1-3.3 TB/s with 96 programs of 64 columns (benchmarks/results/decode_experts),
where the copy rate is ~4.2. This kernel does only the streaming part of an up program: program
p reads a [D / SPLIT, BN] slab of one expert's [D, I] weight (or, TRANSPOSED, of an [I, D]
weight: BN rows of D contiguous elements) in [BK, BN] tiles and multiplies it by a constant
16-row tile, as the expert kernels do (so Triton pipelines the loads), then stores BN sums.
Each configuration runs over 8 copies of the weights (one per "layer", so L2 holds none of
them between calls) in a CUDA graph; µs per call is the median of the replays over 8
(decode_attention.time_per_call).

    PYTHONPATH=. python benchmarks/decode_stream_probe.py --out $OUT   # one H200: ~2 min

writes OUT/decode_stream_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import time_per_call  # noqa: E402

D, I, EXPERTS, LAYERS, REPS = 2048, 1536, 8, 8, 30


@triton.jit
def _slab_kernel(w_ptr, out_ptr, D: tl.constexpr, I: tl.constexpr, SPLIT: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, TRANSPOSED: tl.constexpr):
    pid = tl.program_id(0)
    tiles: tl.constexpr = I // BN
    e = pid // (tiles * SPLIT)
    r = pid % (tiles * SPLIT)
    n = (r // SPLIT) * BN + tl.arange(0, BN)
    k_lo = (r % SPLIT) * (D // SPLIT)
    w_e = w_ptr + e.to(tl.int64) * D * I
    a = tl.full([16, BK], 1.0, tl.bfloat16)
    acc = tl.zeros([16, BN], tl.float32)
    for k0 in range(k_lo, k_lo + D // SPLIT, BK):
        k = k0 + tl.arange(0, BK)
        if TRANSPOSED:
            w = tl.load(w_e + n[None, :] * D + k[:, None])
        else:
            w = tl.load(w_e + k[:, None] * I + n[None, :])
        acc = tl.dot(a, w, acc)
    tl.store(out_ptr + pid * BN + tl.arange(0, BN), tl.sum(acc, axis=0))


def time_config(ws, out, bn, bk, split, warps, stages, transposed) -> float:
    grid = (EXPERTS * (I // bn) * split,)

    def step():
        for w in ws:
            _slab_kernel[grid](w, out, D=D, I=I, SPLIT=split, BN=bn, BK=bk,
                               TRANSPOSED=transposed, num_warps=warps, num_stages=stages)
    step()  # compiles outside the capture
    return time_per_call(step, len(ws), out.device, REPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ws = [torch.randn(EXPERTS, D, I, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    out = torch.empty(EXPERTS * I * 4, device="cuda", dtype=torch.float32)
    mb = EXPERTS * D * I * 2 / 1e6
    rows = []
    tiles = ((16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64))
    for (bn, bk), split, warps, transposed in itertools.product(tiles, (1, 2, 4), (4, 8),
                                                                (False, True)):
        us = time_config(ws, out, bn, bk, split, warps, 4, transposed)
        row = {"BN": bn, "BK": bk, "SPLIT": split, "warps": warps, "stages": 4,
               "transposed": transposed, "programs": EXPERTS * (I // bn) * split,
               "us": us, "tbps": mb / us}
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = sorted(rows, key=lambda r: r["us"])[:6]
    for r in best:  # stages around the best
        for stages in (3, 6):
            us = time_config(ws, out, r["BN"], r["BK"], r["SPLIT"], r["warps"], stages,
                             r["transposed"])
            row = dict(r, stages=stages, us=us, tbps=mb / us)
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name()
    (args.out / "decode_stream_probe.json").write_text(json.dumps(
        {"gpu": name, "mb_per_call": mb, "rows": rows}, indent=1))
    md = [f"# Decode weight streaming probe ({name}, {datetime.date.today()}): {mb:.1f} MB per "
          f"call ({EXPERTS} experts × [{D}, {I}] bf16)\n",
          f"`python {' '.join(sys.argv)}`; torch {torch.__version__}, triton "
          f"{triton.__version__}; µs per call: median of {REPS} graph replays over {LAYERS}\n",
          "| BN | BK | SPLIT | warps | stages | transposed | programs | µs | TB/s |",
          "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["us"]):
        md.append(f"| {r['BN']} | {r['BK']} | {r['SPLIT']} | {r['warps']} | {r['stages']} | "
                  f"{r['transposed']} | {r['programs']} | {r['us']:.2f} | {r['tbps']:.2f} |")
    (args.out / "decode_stream_probe.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
