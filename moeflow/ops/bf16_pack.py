"""Lossless 12-bit packing of bfloat16 weights, so offloaded experts cross the host link in 3/4
of the bytes (expert_store="packed", moeflow.infer.offload.packed_store).

A bf16 value is sign (1 bit) | exponent (8) | mantissa (7). A weight matrix uses few of the
256 exponents: for a normal distribution, all but ~2e-4 of the values fall within 15
consecutive exponents (the rest are values more than 2^14 times smaller than the largest), and
trained weights are spread alike (benchmarks/packed_experts.py measures trained checkpoints). So
each value is stored as
  * `low`: one byte, sign << 7 | mantissa;
  * `codes`: a 4-bit exponent code, two per byte (element 2i in the low nibble, 2i+1 in the
    high one): code c in 1..15 means exponent base + c - 1, for the tensor's most populated
    window [base, base + 14]; code 0 marks an exception,
  * exceptions: their flat indices (int32) and full 16 bits (int16), patched in after.
Twelve bits per value instead of sixteen, bit for bit the same weights (zeros, subnormals,
infinities and NaNs included: they are exceptions, or inside the window, and either way their
bits come back unchanged). A tensor with more than 1/256 exceptions is not packed
(`pack_bf16` returns None): the exceptions would eat the saving.

Layout of a packed tensor in one uint8 buffer (offsets in `PackedLayout`):
  [low: n][codes: ceil(n/2)][pad to 4][idx: int32 x k][vals: int16 x k][pad to 16]

`pack_bf16` runs where the tensor lives (torch ops: the CPU for a model loaded on the host, the
GPU for one built there). `unpack_bf16` writes a packed buffer into a bf16 tensor: one Triton
launch plus one for the exceptions on CUDA (moeflow.ops.bf16_unpack_triton), plain torch here
(`unpack_bf16_reference`), the same bits either way.

Legend: n elements, k exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW = 15  # exponents a 4-bit code names (code 0 is the exception marker)
MAX_EXCEPTION_SHARE = 256  # pack only if exceptions <= n / this


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class PackedLayout:
    n: int  # elements
    k: int  # exceptions
    base: int  # exponent of code 1

    @property
    def codes(self) -> int:
        return self.n

    @property
    def idx(self) -> int:
        return _align(self.n + (self.n + 1) // 2, 4)

    @property
    def vals(self) -> int:
        return self.idx + 4 * self.k

    @property
    def nbytes(self) -> int:
        return _align(self.vals + 2 * self.k, 16)


def max_packed_bytes(n: int) -> int:
    """The most bytes a packed tensor of n elements takes (at the exception limit)."""
    return PackedLayout(n, n // MAX_EXCEPTION_SHARE, 0).nbytes


def pack_bf16(t: torch.Tensor) -> tuple[torch.Tensor, PackedLayout] | None:
    """(uint8 buffer on t's device, its layout), or None if t has too many exceptions."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"pack_bf16: expects bfloat16, got {t.dtype}")
    bits = t.detach().contiguous().view(torch.int16).flatten()
    n = bits.numel()
    exponent = (bits >> 7).to(torch.uint8)  # the low 8 bits of the shifted value
    hist = torch.bincount(exponent, minlength=256).cumsum(0).tolist()
    covered = [hist[b + WINDOW - 1] - (hist[b - 1] if b else 0) for b in range(256 - WINDOW + 1)]
    base = max(range(len(covered)), key=covered.__getitem__)
    k = n - covered[base]
    if k > n // MAX_EXCEPTION_SHARE:
        return None
    layout = PackedLayout(n, k, base)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=t.device)
    code = exponent - (base - 1)  # uint8 arithmetic wraps: in-window exponents give 1..15
    code = torch.where((code - 1) < WINDOW, code, 0)
    if n % 2:
        code = torch.cat([code, code.new_zeros(1)])
    buf[:n] = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
    buf[n:n + (n + 1) // 2] = code[0::2] | (code[1::2] << 4)
    if k:
        where = (code[:n] == 0).nonzero().flatten()
        buf[layout.idx:layout.vals].view(torch.int32).copy_(where)
        buf[layout.vals:layout.vals + 2 * k].view(torch.int16).copy_(bits[where])
    return buf, layout


def _check(buf: torch.Tensor, layout: PackedLayout, out: torch.Tensor) -> None:
    if out.dtype != torch.bfloat16 or out.numel() != layout.n or not out.is_contiguous():
        raise ValueError(f"unpack_bf16: out must be a contiguous bfloat16 tensor of {layout.n} "
                         f"elements, got {out.dtype} {tuple(out.shape)}")
    if buf.dtype != torch.uint8 or buf.numel() < layout.nbytes - 15:
        raise ValueError(f"unpack_bf16: buffer of {buf.numel()} bytes ({buf.dtype}) for a "
                         f"layout of {layout.nbytes}")


def unpack_bf16_reference(buf: torch.Tensor, layout: PackedLayout, out: torch.Tensor) -> None:
    """Write the packed tensor in `buf` into `out` (bf16, n elements), plain torch."""
    _check(buf, layout, out)
    n, k = layout.n, layout.k
    low = buf[:n].to(torch.int32)
    codes = buf[n:n + (n + 1) // 2]
    code = torch.stack([codes & 0xF, codes >> 4], dim=1).flatten()[:n].to(torch.int32)
    bits = ((low & 0x80) << 8) | ((code + layout.base - 1) << 7) | (low & 0x7F)
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    if k:
        where = buf[layout.idx:layout.vals].view(torch.int32).long()
        bits[where] = buf[layout.vals:layout.vals + 2 * k].view(torch.int16)
    out.view(torch.int16).view(-1).copy_(bits)


def unpack_bf16(buf: torch.Tensor, layout: PackedLayout, out: torch.Tensor) -> None:
    """unpack_bf16_reference's bits; on CUDA in two Triton launches on the current stream, with
    no allocation (so it may run on a copy stream inside a memory budget)."""
    if not out.is_cuda:
        unpack_bf16_reference(buf, layout, out)
        return
    from moeflow.ops.bf16_unpack_triton import unpack_bf16_triton
    _check(buf, layout, out)
    unpack_bf16_triton(buf, layout, out)
