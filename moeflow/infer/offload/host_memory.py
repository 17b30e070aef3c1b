"""Page-locked host buffers of exactly the size asked for.

torch's pinned allocator (`pin_memory=True`) rounds each allocation up to a power of two (its
caching host allocator files blocks by size class): a Mixtral layer's ~2.1 GB of packed experts
would take 4 GiB of host RAM. Here a plain host tensor of the exact size is page-locked in
place with cudaHostRegister, and unregistered when the tensor object is freed. DMAs from it
run asynchronously like from any pinned memory.
"""

from __future__ import annotations

import weakref

import torch


def pinned_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of `nbytes`, page-locked if `pin` (CUDA must be available)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed ({err}): is the "
                               f"locked-memory limit (ulimit -l) below it?")
        weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    return buf
