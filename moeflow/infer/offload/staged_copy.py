"""Copying pageable host tensors (memory-mapped experts) to the device through pinned staging.

A DMA reads page-locked memory only. `copy_(non_blocking=True)` from pageable memory (a
file mapping) makes the driver stage it through its own bounce buffer, synchronously, and the
pages it touches may first have to come from disk. So the copy is done in chunks through two
pinned buffers of `chunk_bytes` each, alternating:
    host:        fill A(0)  fill B(1)  wait A  fill A(2)  wait B  fill B(3) ...
    copy stream:            DMA A(0)           DMA B(1)          DMA A(2) ...
Filling a buffer is a CPU copy out of the mapping, which pages the chunk in (page-cache hit:
memcpy speed; miss: the disk's read speed); while it runs, the previous chunk's DMA runs on the
copy stream. Before a buffer is filled again the host waits for the event recorded after the
DMA that last read it (`Event.synchronize`), so the host never overwrites a buffer in flight.
The fill converts dtype when the served dtype differs from the stored one. Before the first
chunk of a tensor, madvise(MADV_WILLNEED) over its pages starts the kernel reading all of it
from disk at once, so a cold expert's read runs ahead of the fills instead of page by page
behind them (readahead alone brings 128 KiB at a time); for pages already cached, or memory
that is not a file's, the call does nothing.

The caller issues the copies inside the cache's `copying_into(slot)` context (the copy stream,
after the slot's last reader); the DMAs go on the current stream, so the slot's `ready` event,
recorded after them, covers them. Unlike the pinned store's copies this blocks the host for the
page-in: the bytes have to pass through the CPU once, from the page cache or the disk.

On CPU (tests, the simulated device) the same loop runs with plain buffers and no events: the
same chunk boundaries, fills and copies.

Legend: n elements of one chunk.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

CHUNK_BYTES = 16 << 20
_MADV_WILLNEED = 3
_libc = ctypes.CDLL(None, use_errno=True)


def will_need(t: torch.Tensor) -> None:
    """Ask the kernel to start reading `t`'s pages (a hint: its failure changes nothing)."""
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + t.nbytes - start),
                  _MADV_WILLNEED)


class StagedCopy:
    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 16:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be at least 16")
        self.cuda = device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                        for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self._next = 0  # the buffer the next chunk fills
        self.chunks = 0  # chunks copied (statistics, tests)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """dst.copy_(src) for each (dst on the device, contiguous; src on the host, any
        contiguous memory), chunk by chunk through the two staging buffers."""
        for dst, src in pairs:
            if not dst.is_contiguous() or not src.is_contiguous() or dst.shape != src.shape:
                raise ValueError("staged copy: needs contiguous tensors of one shape")
            dst_n, src_n = dst.view(-1), src.view(-1)
            will_need(src_n)
            step = self.chunk_bytes // max(dst.element_size(), src.element_size())
            for at in range(0, dst_n.numel(), step):
                n = min(step, dst_n.numel() - at)
                b = self._next
                self._next = 1 - b
                if self.cuda:
                    self.events[b].synchronize()  # the DMA that last read buffer b is done
                stage_n = self.buffers[b][:n * dst.element_size()].view(dst.dtype)
                stage_n.copy_(src_n[at:at + n])  # the page-in, on this thread
                dst_n[at:at + n].copy_(stage_n, non_blocking=True)
                if self.cuda:
                    self.events[b].record(torch.cuda.current_stream(dst.device))
                self.chunks += 1
