"""Copying a block of leading columns of a pinned host matrix to the device in one DMA.

A split miss (moeflow.infer.offload.split_experts) sends the device the first Fg of an
expert's F d_ff columns of w_in: rows of Fg elements, F apart in host memory. torch's `copy_`
cannot send a strided host tensor as it is: it first gathers it into a pageable contiguous
temporary on the host (a synchronous memcpy of the whole share on the calling thread), then
copies that from pageable memory (staged, synchronous again). cudaMemcpy2DAsync moves the same
rows straight from the pinned store as one asynchronous 2D DMA on the copy stream, so the host
returns at once. torch does not expose it; the CUDA runtime torch already loaded does
(found in the process's mapped libraries, called through ctypes).

Without CUDA (tests, the simulated device) the copy is a plain strided torch copy: same
values, same code path around it. If the runtime cannot be found (a torch build with a static
CUDA runtime), CUDA falls back to the same torch copy, correct but synchronous;
`two_d_dma()` says which one runs (the benchmark reports it).

Legend: R rows, C source row length, W columns copied (W <= C).
"""

from __future__ import annotations

import ctypes
import functools

import torch

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        return lib
    return None


def two_d_dma() -> bool:
    """Whether CUDA column copies run as one cudaMemcpy2DAsync (else a staged torch copy)."""
    return torch.cuda.is_available() and _cudart() is not None


def copy_columns(dst_RW: torch.Tensor, src_RC: torch.Tensor, stream=None) -> None:
    """dst_RW = src_RC[:, :W], issued on `stream` (the current stream if None) when dst is on
    CUDA. src_RC: host rows with unit column stride (pinned, for the copy to be asynchronous);
    dst_RW: contiguous."""
    R, W = dst_RW.shape
    if dst_RW.device.type != "cuda" or _cudart() is None:
        dst_RW.copy_(src_RC[:, :W], non_blocking=True)
        return
    if src_RC.stride(1) != 1 or not dst_RW.is_contiguous() or src_RC.shape[0] != R:
        raise ValueError("copy_columns: needs unit column stride, a contiguous destination "
                         "and equal row counts")
    elt = dst_RW.element_size()
    stream = torch.cuda.current_stream(dst_RW.device) if stream is None else stream
    err = _cudart().cudaMemcpy2DAsync(
        ctypes.c_void_p(dst_RW.data_ptr()), W * elt, ctypes.c_void_p(src_RC.data_ptr()),
        src_RC.stride(0) * elt, W * elt, R, _HOST_TO_DEVICE, ctypes.c_void_p(stream.cuda_stream))
    if err != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")
