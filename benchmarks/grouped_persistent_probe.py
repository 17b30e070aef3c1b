"""Can a persistent grouped GEMM reach the Qwen3-30B-A3B expert floor at T >= 1024? A probe.

    PYTHONPATH=. python benchmarks/grouped_persistent_probe.py OUT.json [--tokens 4096 16384]

Issue 14 asks the MoE layer's forward for <= 1.5x its floor at T >= 1024; the Qwen3 shape (D 2048,
F 768, E 128, top-8, SwiGLU) sits at 1.8-2.4x, its experts' GEMMs at ~400-470 TFLOP/s. This probe
times, per token count (random top-8 routing, bf16), the up (SwiGLU applied before the store) and
the down GEMM separately:
  - torch._grouped_mm on the rows already in expert order (CUTLASS, plain GEMMs: no activation);
  - moeflow's tiled kernels (one program per tile, rows gathered by pointer loads);
  - a persistent kernel: one program per SM walks the (expert, column tile, row tile) list,
    rows loaded by TMA from the expert-ordered rows or gathered by pointer loads, optionally
    under Triton's warp specialisation (`tl.range(warp_specialize=True)`),
over a few tile configs each, and checks each output against torch._grouped_mm's; then whole
expert MLPs from the token rows (`--no-sweep`: these only), one call and five back to back per
timing: the product paths, the probe's up kernel with the product's down kernel, and
moeflow.ops.persistent_mlp_triton's path. (Session 25's calls ran earlier states of this script:
its own down kernel with in-kernel descriptors, and autotuned / PDL variants of the product
kernels that were not kept; the results README says which call measured what.)
Results (H200, session 25): benchmarks/results/prefill_experts/README.md — the gathering,
warp-specialised persistent kernels became moeflow.ops.persistent_mlp_triton.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from machine import cuda_event_ms
from moeflow.ops import persistent_mlp_triton as pm
from moeflow.ops import tiled_mlp_triton as g
from moeflow.ops.grouped_mlp_triton import expert_mlp_grouped_fused
from moeflow.ops.tiled_mlp_triton import list_tile, tile_list

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def up_persistent(x_ptr, tok_ptr, ends_ptr, w_ptr, h_ptr, N, D, F, E,
                  BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr, A_TMA: tl.constexpr,
                  WS: tl.constexpr):
    n_tiles = tl.cdiv(F, BLOCK_N)
    ee, lo_e, hi_e, tiles_e, cum, total = tile_list(ends_ptr, E, n_tiles, BLOCK_E, BLOCK_M)
    I = 2 * F
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * D, I], strides=[I, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    if A_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, D], strides=[D, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    for t in tl.range(tl.program_id(0), total, NUM_SMS, warp_specialize=WS):
        e, m0, hi, pn = list_tile(ee, lo_e, hi_e, tiles_e, cum, t, n_tiles, BLOCK_M)
        n0 = pn * BLOCK_N
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        if not A_TMA:
            src = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        wrow = e * D
        for k0 in range(0, D, BLOCK_K):
            if A_TMA:
                a = x_desc.load([m0, k0])
            else:
                k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(x_ptr + src[:, None] * D + k[None, :], mask=rmask[:, None], other=0.0)
            acc_g = tl.dot(a, w_desc.load([wrow + k0, n0]), acc_g)
            acc_u = tl.dot(a, w_desc.load([wrow + k0, F + n0]), acc_u)
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * F + n[None, :],
                 act.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & (n < F)[None, :])


UP_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 5),
            (64, 128, 64, 4, 4), (128, 128, 32, 8, 6)]
DOWN_TILES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
              (128, 128, 64, 4, 4), (64, 256, 64, 4, 3), (128, 128, 128, 8, 3)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="the composites only")
    args = ap.parse_args()
    torch.manual_seed(0)
    D, F, E, K = 2048, 768, 128, 8
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w_in = (torch.randn(E, D, 2 * F, device="cuda") * 0.02).bfloat16()
    w_out = (torch.randn(E, F, D, device="cuda") * 0.02).bfloat16()
    rows = []
    for T in args.tokens:
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices.reshape(-1)
        order = torch.argsort(ids, stable=True)
        tok = (order // K).to(torch.int32)
        ends = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
        N = tok.numel()
        xp = x[tok.long()]
        flop_up, flop_down = 2 * N * D * 2 * F, 2 * N * F * D

        def record(kind, cfg, ms, flop, err, note=""):
            row = dict(T=T, kind=kind, cfg=cfg, ms=ms, tflops=flop / ms / 1e9 if ms else None,
                       rel_err=err, note=note)
            print(json.dumps(row), flush=True)
            rows.append(row)
            json.dump(dict(gpu=torch.cuda.get_device_name(), command=" ".join(sys.argv),
                           rows=rows), open(args.out, "w"), indent=1)

        h_ref = torch._grouped_mm(xp, w_in, offs=ends)
        a_ref = (torch.nn.functional.silu(h_ref[:, :F].float()) * h_ref[:, F:].float()).bfloat16()
        y_ref = torch._grouped_mm(a_ref, w_out, offs=ends)
        err = lambda out, ref: float((out.float() - ref.float()).norm() / ref.float().norm())  # noqa
        record("grouped_mm up (no act)", "", cuda_event_ms(
            lambda: torch._grouped_mm(xp, w_in, offs=ends), args.reps, 3), flop_up, 0.0)
        record("grouped_mm down", "", cuda_event_ms(
            lambda: torch._grouped_mm(a_ref, w_out, offs=ends), args.reps, 3), flop_down, 0.0)
        record("tiled up+down (product, autotuned)", "", cuda_event_ms(
            lambda: g.expert_mlp_tiled(x, ends, w_in, None, w_out, None, "swiglu", rows_N=tok),
            args.reps, 3), flop_up + flop_down,
            err(g.expert_mlp_tiled(x, ends, w_in, None, w_out, None, "swiglu", rows_N=tok), y_ref),
            f"up {g._up_tiled_kernel.best_config} down {g._down_tiled_kernel.best_config}")

        h = torch.empty(N, F, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")

        def product_down(h_src, cfg):
            """moeflow.ops.persistent_mlp_triton's down kernel on h_src, one config."""
            bm, bn, bk, w, s, ws = cfg
            return lambda: pm.launch_down(
                h_src, ends, w_out, None, y, sms, ws, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                {"num_warps": w, "num_stages": s})
        for ws in (() if args.no_sweep else (False, True)):  # warp specialisation last
            for a_tma in (True, False):
                for bm, bn, bk, w, s in UP_TILES:
                    cfg = f"A_TMA={a_tma} WS={ws} {bm}x{bn}x{bk} w{w} s{s}"

                    def up():
                        up_persistent[(sms,)](xp if a_tma else x, tok, ends, w_in, h, N, D, F, E,
                                              BLOCK_E=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                              NUM_SMS=sms, A_TMA=a_tma, WS=ws, num_warps=w,
                                              num_stages=s)
                    try:
                        h.fill_(float("nan"))
                        up()
                        e_up = err(h, a_ref)
                        record("persistent up", cfg, cuda_event_ms(up, args.reps, 2), flop_up, e_up)
                    except Exception as exc:  # a config Triton cannot build: recorded, not fatal
                        record("persistent up", cfg, None, flop_up, None, repr(exc)[:300])
            for bm, bn, bk, w, s in DOWN_TILES:
                cfg = f"WS={ws} {bm}x{bn}x{bk} w{w} s{s}"

                down = product_down(a_ref, (bm, bn, bk, w, s, ws))
                try:
                    y.fill_(float("nan"))
                    down()
                    e_dn = err(y, y_ref)
                    record("persistent down", cfg, cuda_event_ms(down, args.reps, 2), flop_down,
                           e_dn)
                except Exception as exc:
                    record("persistent down", cfg, None, flop_down, None, repr(exc)[:300])

        # Whole expert MLPs from the token rows, as the layer runs them, three rounds
        # interleaved: the product path at this size (gather, grouped_mm, one-pass activation,
        # grouped_mm) against persistent up (gathering or after the gather) + down.
        def composite(up_cfg, down_cfg, gather_first):
            bm, bn, bk, w, s, ws = up_cfg
            down = product_down(h, down_cfg)

            def run():
                src = x[tok.long()] if gather_first else x
                up_persistent[(sms,)](src, tok, ends, w_in, h, N, D, F, E, BLOCK_E=128,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_SMS=sms,
                                      A_TMA=gather_first, WS=ws, num_warps=w, num_stages=s)
                down()
                return y
            return run

        variants = {
            "product grouped_mm_fused (gather, grouped_mm, act, grouped_mm)":
                lambda: expert_mlp_grouped_fused(x, ends, w_in, None, w_out, None, "swiglu",
                                                 parked=False, rows_N=tok.long()),
            "product tiled": lambda: g.expert_mlp_tiled(x, ends, w_in, None, w_out, None,
                                                        "swiglu", rows_N=tok),
            "persistent gathering up (no WS) + down WS": composite(
                (128, 128, 64, 8, 4, False), (128, 256, 64, 8, 4, True), False),
            "persistent gathering up WS + down WS": composite(
                (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 4, True), False),
            "gather, persistent TMA up WS + down WS": composite(
                (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 4, True), True),
            "product persistent (expert_mlp_persistent)": lambda: pm.expert_mlp_persistent(
                x, ends, w_in, None, w_out, None, "swiglu", False, rows_N=tok),
        }
        with torch.no_grad():
            for rnd in range(args.rounds):
                for name, fn in variants.items():
                    try:
                        out = fn()
                        err_fn = err(out, y_ref)
                        record(f"composite r{rnd}", name, cuda_event_ms(fn, args.reps, 2),
                               flop_up + flop_down, err_fn)
                        # Five calls back to back per timing: the host issues ahead of the
                        # GPU, so its per-call cost drops out (eager timing of one call pays
                        # the host's time to the first launch).
                        record(f"composite x5 r{rnd}", name, cuda_event_ms(
                            lambda: [fn() for _ in range(5)], args.reps, 1) / 5,
                            flop_up + flop_down, err_fn)
                    except Exception as exc:
                        record(f"composite r{rnd}", name, None, flop_up + flop_down, None,
                               repr(exc)[:300])


if __name__ == "__main__":
    main()
