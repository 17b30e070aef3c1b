"""Probe: which kernel design streams a dense weight fastest for 4-16 rows (batch-16 decode)?

At 16 rows the stream kernel (moeflow.ops.skinny_linear_triton._linear_kernel) reads the
Qwen3-30B-A3B output projection at ~2 TB/s (8.3 µs; the one-row register GEMV 6.0 µs) and
cuBLAS does no better (qkv 8.1 µs). Two suspects, tried here one at a time and together:
- the MMA shape: with 16 rows as the dot's M, Triton cannot use Hopper's warpgroup MMA (M is
  64 per warpgroup); swapping the operands (yᵀ = W·xᵀ: the weight tile is M, the rows are the
  dot's N = 16) lets it (SWAP);
- too few programs and too few bytes in flight: with 64 outputs per program the output
  projection has 32 programs, so K is split over SPLIT programs per output tile, each
  storing fp32 partials; the last of a tile's programs to finish (an atomic ticket) sums them
  in split order (the same sums every run) and stores y; UNROLL issues all of a program's
  loads before its first dot (as the register GEMV does), instead of a num_stages pipeline.

Per shape and rows, each config's median µs per call over 50 replays of a CUDA graph of one
call per weight copy (weights not L2-resident), against F.linear and linear_stream, with each
output's max |y - y_fp32| / max |y_fp32|.

    PYTHONPATH=. python benchmarks/skinny16_probe.py --out $OUT   # one H200, ~3 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import time_per_call  # noqa: E402
from skinny_linear import SHAPES, max_rel_err  # noqa: E402

from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402


@triton.jit
def _step(x_ptr, w_ptr, acc, m, n, k, M, K: tl.constexpr, SWAP: tl.constexpr):
    """One K chunk: acc += W[n, k] · x[m, k]ᵀ (SWAP: acc is [n, m]) or x · Wᵀ ([m, n])."""
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :])
    if SWAP:
        xt = tl.load(x_ptr + m[None, :] * K + k[:, None], mask=(m < M)[None, :], other=0.0)
        return tl.dot(w, xt, acc)
    else:
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m < M)[:, None], other=0.0)
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _probe_kernel(x_ptr, w_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K: tl.constexpr,
                  SPLIT: tl.constexpr, SWAP: tl.constexpr, UNROLL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    KS: tl.constexpr = K // SPLIT
    k_lo = s * KS
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if UNROLL:
        for k0 in tl.static_range(0, KS, BLOCK_K):
            acc = _step(x_ptr, w_ptr, acc, m, n, k_lo + k0 + tl.arange(0, BLOCK_K), M, K, SWAP)
    else:
        for k0 in range(0, KS, BLOCK_K):
            acc = _step(x_ptr, w_ptr, acc, m, n, k_lo + k0 + tl.arange(0, BLOCK_K), M, K, SWAP)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    offs = m[:, None] * N + n[None, :]
    ymask = (m < M)[:, None]
    if SPLIT == 1:
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(part_ptr + s * BLOCK_M * N + offs, out)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            tl.store(ticket_ptr + pid_n, 0)
            tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for j in tl.static_range(SPLIT):
                tot += tl.load(part_ptr + j * BLOCK_M * N + offs, volatile=True)
            tl.store(y_ptr + offs, tot.to(y_ptr.dtype.element_ty), mask=ymask)


# (SWAP, UNROLL, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLITs)
CONFIGS = [
    (1, 0, 64, 128, 4, 4, (1, 2, 4, 8)),
    (1, 0, 64, 256, 4, 3, (2, 4, 8)),
    (1, 0, 128, 128, 8, 3, (2, 4, 8)),
    (1, 0, 64, 64, 4, 6, (2, 4)),
    (1, 1, 64, 128, 4, 1, (4, 8)),
    (1, 1, 64, 256, 4, 1, (4, 8)),
    (0, 0, 16, 256, 4, 4, (2, 4)),
    (0, 0, 32, 256, 4, 4, (2, 4)),
    (0, 0, 16, 512, 4, 4, (2,)),
    (0, 1, 16, 256, 4, 1, (2, 4)),
]


def probe(x, w, y, part, tickets, swap, unroll, bn, bk, warps, stages, split):
    M, K = x.shape
    N = w.shape[0]
    _probe_kernel[(N // bn, split)](x, w, y, part, tickets, M, N, K=K, SPLIT=split, SWAP=swap,
                                    UNROLL=unroll, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                    num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = []
    for sh in SHAPES:
        torch.manual_seed(0)
        weights = [torch.randn(sh.N, sh.K, device=dev, dtype=torch.bfloat16) * sh.K ** -0.5
                   for _ in range(sh.copies)]
        wbytes = weights[0].numel() * 2
        for M in (4, 16):
            x = torch.randn(M, sh.K, device=dev, dtype=torch.bfloat16)
            truth = F.linear(x.float(), weights[0].float())
            y = torch.empty(M, sh.N, device=dev, dtype=torch.bfloat16)
            part = torch.empty(8, 16, sh.N, device=dev, dtype=torch.float32)
            tickets = torch.zeros(sh.N // 16, device=dev, dtype=torch.int32)
            rows = []
            for name, fn in (("f_linear", F.linear), ("stream", linear_stream)):
                err = max_rel_err(fn(x, weights[0]), truth)
                us = time_per_call(lambda fn=fn: [fn(x, w) for w in weights], sh.copies, dev)
                rows.append({"variant": name, "us": us, "err": err})
            for swap, unroll, bn, bk, warps, stages, splits in CONFIGS:
                for split in splits:
                    if sh.K % (split * bk) or sh.N % bn:
                        continue
                    cfg = (swap, unroll, bn, bk, warps, stages, split)
                    try:
                        err = max_rel_err(probe(x, weights[0], y, part, tickets, *cfg), truth)
                        assert not tickets.any()
                        us = time_per_call(
                            lambda cfg=cfg: [probe(x, w, y, part, tickets, *cfg)
                                             for w in weights], sh.copies, dev)
                    except Exception as e:  # noqa: BLE001  (a config that does not compile)
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    rows.append({"variant": "swap{} unroll{} bn{} bk{} w{} s{} split{}".format(
                        *cfg), "us": us, "err": err})
            rows.sort(key=lambda r: r["us"])
            print(f"{sh.name} M={M}: " + "; ".join(
                f"{r['variant']} {r['us']:.2f} µs ({wbytes / r['us'] / 1e6:.2f} TB/s, "
                f"err {r['err']:.1e})" for r in rows[:8]), flush=True)
            base = {r["variant"]: r["us"] for r in rows}
            print(f"   f_linear {base['f_linear']:.2f}, stream {base['stream']:.2f}", flush=True)
            results.append({"shape": sh.name, "K": sh.K, "N": sh.N, "M": M,
                            "weight_bytes": wbytes, "rows": rows})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny16_probe.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
         "triton": triton.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
