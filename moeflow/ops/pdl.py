"""Programmatic dependent launch (PDL) for the decode kernels.

Why: a batch-1 decode step of the Qwen3-30B-A3B shape replayed from its CUDA graph on the H200
runs ~700 kernels, most of them a few µs long, with ~0.45 µs of idle GPU between consecutive
kernels and each kernel's programs ramping up from an empty GPU
(benchmarks/results/decode_timeline). On sm_90+, a kernel launched with
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may be scheduled before the kernel ahead of
it in the stream has finished, once every program of that kernel has signalled (or exited); its
programs then wait (`griddepcontrol.wait`) until the kernel ahead has completed and its memory
writes are visible. The launch and the placement of programs overlap the previous kernel's tail.

Contract of a kernel taking `PDL`: it calls `pdl_enter(PDL)` before its first access to memory
another kernel writes or reads (so nothing of it races the kernel ahead), which also signals its
dependents at once: the decode kernels run at most one wave of programs, so the next kernel's
programs, waiting, only take SM slots this one's programs have left free. A kernel launched
with PDL on but whose predecessor never signals is simply scheduled at that kernel's end.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait for the kernel ahead (its writes visible), then let the next one be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_supported(t: torch.Tensor) -> bool:
    """Whether kernels on t's device can be launched with PDL (CUDA, sm_90 or newer)."""
    return t.is_cuda and _device_has_pdl(t.device.index if t.device.index is not None
                                         else torch.cuda.current_device())


def pdl_launch(pdl: bool) -> dict:
    """Launch keywords of a kernel taking a `PDL` constexpr: the flag, and Triton's launch
    option where it is on (the interpreter takes no launch options)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
