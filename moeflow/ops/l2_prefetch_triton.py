"""Pull a tensor's bytes into the GPU's L2 cache ahead of the kernel that reads them:
`prefetch_l2(t)` launches one small Triton kernel whose threads each issue one Hopper bulk
prefetch (`cp.async.bulk.prefetch.L2.global`) of a CHUNK-byte piece of `t`; nothing is written
and nothing waits for the bytes. It has no effect on what any kernel computes, only on where its
loads are served from.

Why: a batch-1 decode step is a chain of weight-streaming kernels (each a few µs at the memory
bandwidth, plus its ramp and tail) and latency-bound small kernels (norms, attention over a short
cache, the router) during which HBM idles. Launched on a side stream beside the small kernels, a
prefetch of the next projection's weight (the output projection's 16.8 MB on the Qwen3-30B-A3B
shape, L2 is 50 MB on the H200) moves its HBM read into that idle time; the projection then
reads L2. benchmarks/l2_prefetch_probe.py measures whether it does.

Where bulk prefetch does not exist (not sm_90+, the CPU interpreter) the call does nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes per prefetch instruction (a multiple of 16, the bulk copy's granule).
CHUNK = 16384
# Prefetch instructions per program (one per thread of 4 warps).
BLOCK = 128


@triton.jit
def _prefetch_kernel(base_ptr, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = chunk.to(tl.int64) * CHUNK
    # The last chunk is cut to what is left (rounded down to 16 bytes: the bulk granule); lanes
    # past the end prefetch 16 bytes of the tensor's start, which is harmless.
    size = tl.minimum(n_bytes - start, CHUNK) // 16 * 16
    live = size > 0
    size = tl.where(live, size, 16).to(tl.int32)
    start = tl.where(live, start, 0)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_supported(t: torch.Tensor) -> bool:
    """Whether prefetch_l2 does anything for `t`: a CUDA tensor on a GPU of sm_90 or later."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def prefetch_l2(t: torch.Tensor) -> None:
    """Ask the GPU to bring `t`'s storage (contiguous, 16-byte aligned) into L2, on the current
    stream; returns at once. A no-op where prefetch_supported(t) is False."""
    if not prefetch_supported(t) or t.numel() == 0:
        return
    if not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError(f"prefetch_l2: the tensor must be contiguous and 16-byte aligned, got "
                         f"strides {t.stride()} at address {t.data_ptr():#x}")
    n_bytes = t.numel() * t.element_size()
    base = t.view(-1).view(torch.uint8)
    _prefetch_kernel[(triton.cdiv(triton.cdiv(n_bytes, CHUNK), BLOCK),)](
        base, n_bytes, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
