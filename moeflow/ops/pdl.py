"""Programmatic dependent launch (PDL) for the decode step's kernels, on Hopper and later.

Why: a batch-1 decode step of the Qwen3-30B-A3B shape is a chain of ~400 kernels, each waiting
for the one ahead (benchmarks/results/decode_timeline: ~0.43 µs of idle GPU at every boundary,
plus each kernel's ramp as its first programs start). Launched with PDL, a kernel is scheduled
while the one ahead still runs: its programs become resident and wait in hardware
(griddepcontrol.wait) until that kernel has finished and its writes are visible, so the launch
and ramp overlap the tail ahead of them.

How: every kernel that takes a `PDL` constexpr calls `wait_for_previous(PDL)` before it reads or
writes memory, so ordering is what it is without PDL: nothing is read or written before the
kernel ahead is done, and since that kernel itself waited for the one before it, every earlier
kernel's writes are visible too. It calls `launch_next(PDL)` once its main loads are issued (the
weight-streaming loops, the router's logits tiles; the expert kernels at their start), so the
next kernel's launch and ramp overlap this kernel's tail. The latency-bound one-row kernels ahead
of a projection (the decode attention, the norm) call it right after their wait: the
projection's programs then become resident on the SMs they leave idle, and the output
projection prefetches its weight to L2 meanwhile (moeflow.ops.skinny_linear_triton, warm_l2;
session 33: batch-1 layer 49.2 -> 48.2-48.4 µs). A kernel ahead
that is not PDL-aware (torch, cuBLAS) never lets the next one in early; the wait then returns at
once. The one exception to "nothing before the wait" is an L2 prefetch (`prefetch_l2`) of
read-only inputs the kernel ahead does not write: a hint that reads nothing into the kernel, so
the latency-bound decode kernels (the norm, the attention) find their weights and older cache
rows in L2 after the wait (session 32: the norm's end step 2.43-2.53 -> 2.16-2.20 µs, the
attention's -0.1; the router's gate rows gained nothing and are not prefetched).
`pdl_launch(t)` gives the launch keywords: PDL on CUDA devices of compute capability 9 and up
(griddepcontrol is sm_90 PTX), off elsewhere (older GPUs, Triton's interpreter).

Measured (one H200, 2026-12-03): a graph of 16 stand-in attention halves (latency-bound kernel
→ qkv GEMV → latency-bound kernel → output GEMV; benchmarks/pdl_prefetch_probe.py) ran 15.78 →
13.28 µs per layer with PDL; having the GEMVs load their weights before the wait was slower
(14.00), so the wait comes first. In the engine's batch-1 decode graph (results/decode_timeline,
three trees in one call) letting the next kernel in at the start made the step slower (3.028 ms
against 2.943 without PDL: small kernels launch their successors in a cascade, session 13's +5%
too, results/pdl_probe); letting it in once the main loads are issued gave 2.858 ms. Batch 16
did not move (11.976 vs 11.995: its qkv projection was cuBLAS then, which PDL does not
overlap; streamed since session 17).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict:
    """Keywords for launching a kernel with a `PDL` constexpr on t's device."""
    if t.is_cuda and _hopper_or_later(t.device.index if t.device.index is not None
                                      else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def prefetchable(t: torch.Tensor, *spans: int) -> bool:
    """Whether prefetch_l2 may warm spans of t: t on a GPU that launches with PDL (the bulk
    prefetch is sm_90 PTX, and only a kernel let in early has a kernel ahead to overlap), 16-byte
    aligned, and every span length and stride given (in t's elements) a multiple of 16 bytes,
    as the bulk prefetch requires."""
    return (pdl_launch(t)["PDL"] and t.data_ptr() % 16 == 0
            and all(n * t.element_size() % 16 == 0 for n in spans))


@triton.jit
def prefetch_l2(ptr, count):
    """Warm L2 with the `count` elements from `ptr` (address and bytes multiples of 16:
    prefetchable), one bulk prefetch issued by the program's first thread (sm_90). For a PDL
    kernel's read-only inputs that the kernel ahead does not write (weights, older cache rows):
    issued before the wait, the trip to HBM overlaps the kernel ahead and the loads after the
    wait find L2. A prefetch is a hint, not a load: nothing reads it, so it orders nothing."""
    nbytes = count * (ptr.dtype.element_ty.primitive_bitwidth // 8)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, (tl.zeros([], tl.int32) + nbytes).to(tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """A PDL kernel's first step: wait until the kernel ahead has finished and its writes are
    visible (a no-op when the kernel was not launched early)."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_next(PDL: tl.constexpr):
    """Let the next kernel be scheduled (its programs then wait for this kernel to finish)."""
    if PDL:
        gdc_launch_dependents()
