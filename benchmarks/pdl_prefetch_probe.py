"""Programmatic dependent launch (PDL) where the dependent kernel loads its weights before it
waits: does a batch-1 projection start streaming while the latency-bound kernel ahead of it
still runs?

Session 13 (results/pdl_probe) launched the decode MoE kernels with PDL and had each wait for its
predecessor first thing: nothing to overlap, and 5% slower. Session 14 (results/l2_prefetch)
found a projection's cost is mostly its ramp and tail, not HBM bandwidth. A projection's
weight does not depend on the kernel ahead, so under PDL its programs can issue their weight
loads at once and wait (griddepcontrol.wait) only before loading x: the ramp then runs under the
predecessor. This probe measures that in a CUDA graph of L stand-in attention halves of the
Qwen3-30B-A3B shape (own weights per layer, so every read is from HBM):

    chain (HOPS dependent L2 loads, 16-32 programs) -> qkv GEMV [5120, 2048]
    -> chain -> output GEMV [2048, 4096]

in three modes: `plain` (no PDL), `wait_first` (PDL; each kernel lets the next launch at its
start and waits before any load: session 13's design), `prefetch` (PDL; the GEMVs load their
weight slab, then wait, then load x). µs per layer is the median graph replay over L layers;
the outputs of the three modes must be equal bit for bit (same arithmetic, same order).

    PYTHONPATH=. python benchmarks/pdl_prefetch_probe.py --out $OUT    # one H200: ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import time_per_call  # noqa: E402

from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402

MODES = {"plain": 0, "wait_first": 1, "prefetch": 2}


@triton.jit
def _chain_kernel(y_ptr, x_ptr, table_ptr, N_IN, K_OUT, HOPS, MODE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """A latency-bound step: HOPS dependent loads from a small (L2-resident) table, then
    x = y / 2 over BLOCK outputs per program (y read cyclically)."""
    pid = tl.program_id(0)
    if MODE > 0:
        gdc_launch_dependents()
        gdc_wait()
    idx = pid
    for _ in range(HOPS):
        idx = tl.load(table_ptr + idx)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < K_OUT
    y = tl.load(y_ptr + offs % N_IN, mask=m, other=0.0).to(tl.float32)
    y += (idx < 0).to(tl.float32)  # keeps the chain of loads alive; idx is never negative
    tl.store(x_ptr + offs, (y * 0.5).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 MODE: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, K)
    if MODE > 0:
        gdc_launch_dependents()
    if MODE == 1:
        gdc_wait()
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :])
    if MODE == 2:
        gdc_wait()
    x = tl.load(x_ptr + k).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty))


def gemv(x, w, y, block_n, warps, mode):
    N, K = w.shape
    _gemv_kernel[(N // block_n,)](x, w, y, K=K, BLOCK_N=block_n, MODE=mode, num_warps=warps,
                                  launch_pdl=mode > 0)


def chain(y, x, table, hops, mode, block=128):
    _chain_kernel[(triton.cdiv(x.numel(), block),)](y, x, table, y.numel(), x.numel(), hops,
                                                    MODE=mode, BLOCK=block, num_warps=4,
                                                    launch_pdl=mode > 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hops", type=int, nargs="+", default=[0, 8, 24])
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    D, Q, L = 2048, 4096, args.layers
    w_qkv = [torch.randn(Q + 1024, D, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
    w_o = [torch.randn(D, Q, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
    table = torch.randperm(4096, device=dev, dtype=torch.int32)
    x0 = torch.randn(D, device=dev, dtype=torch.bfloat16)
    bufs = dict(x1=torch.empty(D, device=dev, dtype=torch.bfloat16),
                y1=torch.empty(Q + 1024, device=dev, dtype=torch.bfloat16),
                x2=torch.empty(Q, device=dev, dtype=torch.bfloat16),
                y2=torch.empty(D, device=dev, dtype=torch.bfloat16))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "layers": L, "rows": []}

    # The probe kernel against the engine's GEMV (autotuned) on one projection each, plain.
    tiles = {"qkv": [(4, 8), (2, 8), (8, 8)], "o": [(2, 8), (1, 8), (4, 8)]}
    best = {}
    for name, ws, xin, yout in (("qkv", w_qkv, bufs["x1"], bufs["y1"]),
                                ("o", w_o, bufs["x2"], bufs["y2"])):
        xin.normal_()
        ref = linear_stream(xin[None], ws[0])[0]
        timed = {}
        for bn, warps in tiles[name]:
            gemv(xin, ws[0], yout, bn, warps, 0)
            torch.cuda.synchronize()
            err = (yout.float() - ref.float()).abs().max().item()
            timed[(bn, warps)] = time_per_call(
                lambda bn=bn, warps=warps: [gemv(xin, w, yout, bn, warps, 0) for w in ws], L,
                dev, args.reps)
            print(f"{name} probe GEMV BLOCK_N {bn} warps {warps}: {timed[(bn, warps)]:.2f} us "
                  f"(max |diff| vs linear_stream {err:.3g})", flush=True)
        engine_us = time_per_call(lambda: [linear_stream(xin[None], w) for w in ws], L, dev,
                                  args.reps)
        best[name] = min(timed, key=timed.get)
        print(f"{name} engine linear_stream: {engine_us:.2f} us; probe best {best[name]}",
              flush=True)
        results["rows"].append({"kind": "single", "proj": name, "engine_us": engine_us,
                                "probe_us": {f"{k[0]}x{k[1]}": v for k, v in timed.items()}})

    def layers(hops, mode):
        y = bufs["y2"]
        y.copy_(x0)
        for i in range(L):
            chain(y, bufs["x1"], table, hops, mode)
            gemv(bufs["x1"], w_qkv[i], bufs["y1"], *best["qkv"], mode)
            chain(bufs["y1"], bufs["x2"], table, hops, mode)
            gemv(bufs["x2"], w_o[i], bufs["y2"], *best["o"], mode)
            y = bufs["y2"]

    for hops in args.hops:
        outs = {}
        for mode_name, mode in MODES.items():
            us = time_per_call(lambda: layers(hops, mode), L, dev, args.reps)
            layers(hops, mode)
            outs[mode_name] = bufs["y2"].clone()
            chain_us = time_per_call(  # the chain kernel alone, for scale
                lambda: [chain(bufs["y1"], bufs["x2"], table, hops, 0) for _ in range(L)], L,
                dev, args.reps)
            equal = bool(torch.equal(outs[mode_name], outs["plain"]))
            print(f"hops {hops} {mode_name}: {us:.2f} us per layer (chain kernel alone "
                  f"{chain_us:.2f} us; equal to plain: {equal})", flush=True)
            results["rows"].append({"kind": "layers", "hops": hops, "mode": mode_name,
                                    "us_per_layer": us, "chain_us": chain_us, "equal": equal})
    (args.out / "pdl_prefetch_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
