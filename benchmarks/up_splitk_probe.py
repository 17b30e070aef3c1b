"""Would splitting the decode up kernel along the model dim pay, with the last split finishing?

At batch 1 of Qwen3-30B-A3B the expert up kernel (moeflow.ops.grouped_mlp_triton._up_kernel)
runs 8 active experts × 12 column tiles = 96 programs on the H200's 132 SMs and reads its 50 MB
at ~3.2 TB/s (15.2-15.8 µs; benchmarks/results/decode_timeline). A split-K variant tried in
session 8 summed the fp32 partials in the down kernel's prologue and lost there. Here the split
stays inside the up launch: each of SPLIT programs per (expert, column tile) multiplies its
D/SPLIT slice, stores fp32 partials, and takes a ticket (release-acquire atomic) on its tile's
counter; the last one sums the partials in a fixed order (split 0 first: the same bits whichever
program finishes last), applies SwiGLU and stores h. Per T (1 and 16 tokens, top-8 of 128
experts, routings cycled so weights come from HBM): the current up kernel (autotuned) against a
sweep of split configs, µs per call, and each one's max |h - h_fp32|.

    PYTHONPATH=. python benchmarks/up_splitk_probe.py --out $OUT    # one H200: ~1 min
"""

from __future__ import annotations

import argparse
import itertools
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

from moeflow.ops import grouped_mlp_triton as gm  # noqa: E402


@triton.jit
def _up_split_kernel(x_ptr, token_ptr, ends_ptr, w_ptr, part_ptr, tickets_ptr, h_ptr, N, D, F,
                     E, SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    e, lo, hi = gm._active_expert(ends_ptr, i, E, BLOCK_E)
    tile = tl.program_id(1) // SPLIT
    ks = tl.program_id(1) % SPLIT
    if hi > lo:
        I = 2 * F
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < F
        w_e = w_ptr + e.to(tl.int64) * D * I
        d_per = D // SPLIT
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < hi
            src = tl.load(token_ptr + rows, mask=rmask, other=0)
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(ks * d_per, (ks + 1) * d_per, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(x_ptr + src[:, None].to(tl.int64) * D + k[None, :],
                            mask=rmask[:, None], other=0.0)
                wg = tl.load(w_e + k[:, None] * I + n[None, :], mask=nmask[None, :], other=0.0)
                wu = tl.load(w_e + k[:, None] * I + (F + n)[None, :], mask=nmask[None, :],
                             other=0.0)
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
            part = part_ptr + ks * N * I + rows[:, None].to(tl.int64) * I + n[None, :]
            pmask = rmask[:, None] & nmask[None, :]
            tl.store(part, acc_g, mask=pmask)
            tl.store(part + F, acc_u, mask=pmask)
        tl.debug_barrier()
        counter = tickets_ptr + i * (tl.num_programs(1) // SPLIT) + tile
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            tl.store(counter, 0)
            for m0 in range(lo, hi, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                pmask = (rows < hi)[:, None] & nmask[None, :]
                part = part_ptr + rows[:, None].to(tl.int64) * I + n[None, :]
                g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in tl.static_range(SPLIT):
                    g += tl.load(part + s * N * I, mask=pmask, other=0.0)
                    u += tl.load(part + s * N * I + F, mask=pmask, other=0.0)
                tl.store(h_ptr + rows[:, None].to(tl.int64) * F + n[None, :],
                         (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=pmask)


def routings(T: int, K: int, E: int, count: int, device):
    """`count` routings of T tokens to K distinct experts each: (ends_E, rows_N) per routing,
    rows sorted by expert as the decode router lays them out."""
    g = torch.Generator().manual_seed(T)
    out = []
    for _ in range(count):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = (torch.arange(T * K) // K)[order]
        ends = torch.bincount(flat, minlength=E).cumsum(0)
        out.append((ends.to(device), tokens.to(device)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-sweep", action="store_true", help="time the current kernel only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    E, D, Fd, K = 128, 2048, 768, 8
    torch.manual_seed(0)
    w_in = torch.randn(E, D, 2 * Fd, device=dev, dtype=torch.bfloat16) / D ** 0.5
    results = [{"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}]
    for T, count in ((1, 16), (16, 4)):
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        plans = routings(T, K, E, count, dev)
        N = T * K
        h = torch.empty(N, Fd, device=dev, dtype=torch.bfloat16)
        bucket, a_bucket = gm.tune_keys(N, E)
        block_m = 16 if bucket <= 16 else 32 if bucket <= 32 else 64
        active = min(N, E)

        def current():
            for ends, rows in plans:
                gm._up_kernel[lambda meta: (active, triton.cdiv(Fd, meta["BLOCK_N"]))](
                    x, rows, ends, w_in, w_in, h, D, Fd, E, bucket, a_bucket, SWIGLU=True,
                    HAS_BIAS=False, GATHER=True, BLOCK_E=E, BLOCK_M=block_m)
        ends0, rows0 = plans[0]
        experts_N = torch.repeat_interleave(torch.arange(E, device=dev),
                                            torch.diff(ends0, prepend=ends0.new_zeros(1)))
        hx = torch.einsum("nd,ndi->ni", x.float()[rows0], w_in.float()[experts_N])
        h_ref = F.silu(hx[:, :Fd]) * hx[:, Fd:]
        row = {"T": T, "current_us": time_per_call(current, count, dev)}
        current()
        row["current_cfg"] = str(gm._up_kernel.best_config)
        sweep = []
        tickets = torch.zeros(active * 64, dtype=torch.int32, device=dev)
        part = torch.empty(4, N, 2 * Fd, device=dev, dtype=torch.float32)
        for bn, bk, w, st, split in itertools.product((32, 64, 128), (64, 128), (4,), (3, 4),
                                                      () if args.no_sweep else (2, 4)):
            grid = (active, triton.cdiv(Fd, bn) * split)

            def run(bn=bn, bk=bk, w=w, st=st, split=split, grid=grid):
                for ends, rows in plans:
                    _up_split_kernel[grid](x, rows, ends, w_in, part, tickets, h, N, D, Fd, E,
                                           SPLIT=split, BLOCK_E=E, BLOCK_M=block_m, BLOCK_N=bn,
                                           BLOCK_K=bk, num_warps=w, num_stages=st)
            try:
                us = time_per_call(run, count, dev)
                _up_split_kernel[grid](x, rows0, ends0, w_in, part, tickets, h, N, D, Fd, E,
                                       SPLIT=split, BLOCK_E=E, BLOCK_M=block_m, BLOCK_N=bn,
                                       BLOCK_K=bk, num_warps=w, num_stages=st)
                err = (h.float() - h_ref).abs().max().item()
                sweep.append({"BLOCK_N": bn, "BLOCK_K": bk, "warps": w, "stages": st,
                              "SPLIT": split, "us": round(us, 2), "err": err,
                              "tickets_zero": not bool(tickets.any())})
            except Exception as exc:  # noqa: BLE001  (a config that does not fit: named)
                print(f"T {T} {bn} {bk} {w} {st} {split}: {type(exc).__name__}", flush=True)
        sweep.sort(key=lambda r: r["us"])
        # current kernel's error on routing 0
        gm._up_kernel[lambda meta: (active, triton.cdiv(Fd, meta["BLOCK_N"]))](
            x, rows0, ends0, w_in, w_in, h, D, Fd, E, bucket, a_bucket, SWIGLU=True,
            HAS_BIAS=False, GATHER=True, BLOCK_E=E, BLOCK_M=block_m)
        row["current_err"] = (h.float() - h_ref).abs().max().item()
        row["split_best"] = sweep[:6]
        row["current_cfg_after"] = str(gm._up_kernel.best_config)
        print(json.dumps(row), flush=True)
        results.append(row)
    (args.out / "up_splitk_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
