"""Where the decode router's kernel time goes: the plan program alone (route_decode_triton:
top-k and the dispatch plan over given logits) against the fused kernel (route_decode_fused:
the logits too), over tokens T and top-k K on the Qwen3-30B-A3B router (E 128, D 2048); the
prefill router's top-k kernel at 2048 / 16384 tokens; and the logits tiles at 1024 products
per warp (before session 19: D in chunks of 512 at 16 tokens) instead of 4096. µs: the
profiler's kernel records, median of 15 calls.

--skip takes a phase out of the kernels, to price it by difference (the results are then
wrong; run each in its own process, so that nothing compiled before the patch is reused):
"pass2" leaves only the counts and ends of the plan (no queue slots, rows or token list, no
losses; as route_decode_fused(place_rows=False) does, less the losses), "routing" leaves only
the logits (no program draws the last ticket). route_decode_fused places the rows here (the
default), as it did before session 24.

    PYTHONPATH=. python benchmarks/route_phases.py [--tokens T ...] [--skip pass2|routing]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import cuda_kernel_events  # noqa: E402

import moeflow.ops.decode_route_fused_triton as fused_route  # noqa: E402
import moeflow.ops.decode_route_triton as drt  # noqa: E402
from moeflow.config import RouterConfig  # noqa: E402
from moeflow.ops.routing_triton import route_triton  # noqa: E402

E, D = 128, 2048


def call_kernel_us(fn, key: str, reps: int = 15) -> float:
    """Median over `reps` calls of fn of the summed device time of its kernels whose name
    contains `key` (a call's whole routing, not one kernel; L2 not flushed, unlike
    decode_route.py's kernel_us: this compares phases, not the gate's read)."""
    for _ in range(3):
        fn()
    return statistics.median(
        sum(e.time_range.elapsed_us() for e in cuda_kernel_events(fn) if key in e.name)
        for _ in range(reps))


def sweep(shapes, label: str, ticket, gate) -> None:
    for T, K in shapes:
        cfg = RouterConfig(top_k=K, normalize_topk=True, dropless=True, aux_loss_coef=0.001)
        logits = torch.randn(T, E, device="cuda")
        x = torch.randn(T, D, device="cuda").to(torch.bfloat16)
        plan = call_kernel_us(lambda: drt.route_decode_triton(logits, cfg, None), "route")
        fused = call_kernel_us(
            lambda: fused_route.route_decode_fused(x, gate, cfg, None, ticket), "route")
        print(f"{label}T {T:2d} K {K}: plan alone {plan:6.2f} us, fused {fused:6.2f} us",
              flush=True)


@triton.jit
def _counts_and_ends_only(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                          ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E,
                          routed_scaling, aux_coef, z_coef, capacity, K: tl.constexpr,
                          FIRST_BALANCE: tl.constexpr, CAPPED: tl.constexpr,
                          RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                          PAIRWISE: tl.constexpr, PLACE: tl.constexpr = True):
    """--skip pass2: drt.plan_passes' signature, storing only the counts and their prefix
    sum."""
    cols = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + cols, counts.to(tl.int64), mask=cols < E)
    tl.store(ends_ptr + cols, tl.cumsum(counts, axis=0).to(tl.int64), mask=cols < E)


@triton.jit
def _never_last(counter_ptr, arrivals):
    """--skip routing: no program draws the last ticket (the counter is left untouched)."""
    tl.debug_barrier()
    return tl.program_id(0) < 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+",
                    help="only these T (top-8), nothing else (to compare two trees quickly)")
    ap.add_argument("--skip", choices=["pass2", "routing"],
                    help="take this phase out of the decode kernels (see the docstring)")
    args = ap.parse_args()
    if args.skip == "pass2":
        drt.plan_passes = fused_route.plan_passes = _counts_and_ends_only
    elif args.skip == "routing":
        fused_route.last_to_arrive = _never_last
    ticket = fused_route.route_tickets("cuda")
    gate = (torch.randn(E, D, device="cuda") * 0.02).to(torch.bfloat16)
    if args.tokens:
        sweep([(T, 8) for T in args.tokens], "", ticket, gate)
        return
    sweep([(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 1), (16, 2), (16, 4),
           (16, 8), (32, 8), (64, 8)], "", ticket, gate)
    cfg = RouterConfig(top_k=8, normalize_topk=True, dropless=True, aux_loss_coef=0.001)
    for T in (2048, 16384):
        logits = torch.randn(T, E, device="cuda")
        run = lambda: route_triton(logits, cfg, None, None, None, None)  # noqa: E731
        print(f"prefill T {T}: topk kernel {call_kernel_us(run, 'topk'):7.2f} us, all routing "
              f"kernels {call_kernel_us(run, ''):7.2f} us", flush=True)
    products = fused_route._LOGIT_PRODUCTS_PER_WARP  # session 18's tiles: D in chunks at 8+
    fused_route._LOGIT_PRODUCTS_PER_WARP = 1024
    fused_route.logits_tiles.cache_clear()
    try:
        sweep([(1, 8), (8, 8), (16, 8), (32, 8)], "1024 products per warp: ", ticket, gate)
    finally:
        fused_route._LOGIT_PRODUCTS_PER_WARP = products
        fused_route.logits_tiles.cache_clear()


if __name__ == "__main__":
    main()
