"""Experts in pinned host memory packed losslessly to 12 bits per weight (expert_store="packed").

Offloaded decoding is bound by the bytes copied per token (the transfer floor: at batch 1 a
Mixtral-8x7B step misses ~50 experts of 352 MB at ~55 GB/s). Packing each bf16 weight into a
sign|mantissa byte and a 4-bit exponent code (moeflow.ops.bf16_pack) sends 3/4 of the bytes:
a miss copies the expert's packed bytes into a device staging buffer, then one Triton kernel
per weight matrix rebuilds the bf16 values in the cache slot, bit for bit, on the same copy
stream (so the slot's `ready` event covers both, and the next miss's copy cannot overwrite the
staging buffer before the kernel has read it). The slots hold plain bf16 experts, so the
layers compute exactly as with the pinned store. The staging buffer (one packed expert at the
exception limit) comes out of the budget like a slot.

Weight matrices with too many exceptions to pay (`pack_bf16` returns None) and biases are
stored raw and copied straight into the slot. Each layer's experts sit in one exact-size pinned
buffer (moeflow.infer.offload.host_memory): per expert its packed sections back to back (one
DMA), then its raw ones. On the CPU (tests, the simulated device) nothing is pinned and
`copy_expert` unpacks straight from the host buffer into the slot.

Same interface as ExpertStore (moeflow.infer.offload.expert_store); `expert(layer, e)`, for the
CPU paths, unpacks into new tensors.

Legend: E experts of a layer, D model dim, F expert ffn dim, I = F or 2F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.infer.offload.expert_store import LayerExperts
from moeflow.infer.offload.host_memory import pinned_buffer
from moeflow.ops.bf16_pack import PackedLayout, max_packed_bytes, pack_bf16, unpack_bf16

_PACKABLE = 2  # of an expert's tensors (w_in, w_out, b_in, b_out), the first two are packed


@dataclass(frozen=True)
class _Section:
    tensor: int  # index into (w_in, w_out, b_in, b_out)
    offset: int  # bytes into the layer's buffer
    nbytes: int
    layout: PackedLayout | None  # None: stored raw


@dataclass(frozen=True)
class _PackedExpert:
    start: int  # the packed sections: bytes [start, packed_end) of the layer's buffer
    packed_end: int
    sections: tuple[_Section, ...]

    @property
    def raw_bytes(self) -> int:
        return sum(s.nbytes for s in self.sections if s.layout is None)


def staging_bytes(template: LayerExperts) -> int:
    """The device staging buffer: one expert's weight matrices packed at the exception limit."""
    return sum(max_packed_bytes(t[0].numel()) for t in template.tensors()[:_PACKABLE])


def _meta(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")


class PackedExpertStore:
    kind = "packed"

    def __init__(self, device: torch.device, template: LayerExperts) -> None:
        self.pin = device.type == "cuda"
        self.buffers: list[torch.Tensor] = []  # [layer] -> uint8 host buffer
        self.experts: list[list[_PackedExpert]] = []  # [layer][e]
        self.templates: list[LayerExperts] = []  # [layer] -> shapes and dtype (meta tensors)
        self.staging = None
        if self.pin:
            self.staging = torch.empty(staging_bytes(template), dtype=torch.uint8, device=device)

    def add_layer(self, w_in_EDI: torch.Tensor, w_out_EFD: torch.Tensor,
                  b_in_EI: torch.Tensor | None, b_out_ED: torch.Tensor | None) -> int:
        """Pack one layer's experts into a new host buffer (on the tensors' device, then
        copied over); returns the layer's index."""
        tensors = (w_in_EDI, w_out_EFD, b_in_EI, b_out_ED)
        for t in tensors[:_PACKABLE]:
            if t.dtype != torch.bfloat16:
                raise ValueError(f"expert_store='packed': packs bfloat16 experts; MoE layer "
                                 f"{len(self.buffers)}'s are {t.dtype} (serve in bfloat16, or "
                                 f"use expert_store 'pinned')")
        pieces, records, offset = [], [], 0
        for e in range(w_in_EDI.shape[0]):
            packed, raw = [], []
            for j, t in enumerate(tensors):
                if t is None:
                    continue
                p = pack_bf16(t[e]) if j < _PACKABLE else None
                (packed if p is not None else raw).append((j, t[e], p))
            sections, start = [], offset
            for j, src, p in packed + raw:
                data, layout = (p if p is not None else
                                (src.detach().contiguous().view(-1).view(torch.uint8), None))
                sections.append(_Section(j, offset, data.numel(), layout))
                pieces.append((offset, data))
                offset += -(-data.numel() // 16) * 16
            last = sections[len(packed) - 1] if packed else None
            packed_end = last.offset + last.nbytes if last else start
            records.append(_PackedExpert(start, packed_end, tuple(sections)))
        buf = pinned_buffer(offset, self.pin)
        for at, data in pieces:
            buf[at:at + data.numel()].copy_(data)
        del pieces
        self.buffers.append(buf)
        self.experts.append(records)
        self.templates.append(LayerExperts(*(_meta(t) for t in tensors)))
        return len(self.buffers) - 1

    @property
    def num_layers(self) -> int:
        return len(self.buffers)

    def num_experts(self, layer: int) -> int:
        return len(self.experts[layer])

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def total_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    @property
    def unpacked_bytes(self) -> int:
        """What the pinned store would hold for the same experts."""
        return sum(t.numel() * t.element_size() for tpl in self.templates for t in tpl.tensors())

    @property
    def packed_tensors(self) -> int:
        """Expert tensors stored packed (the rest, `raw_tensors`, are stored as they were)."""
        return sum(s.layout is not None for layer in self.experts for rec in layer
                   for s in rec.sections)

    @property
    def raw_tensors(self) -> int:
        return sum(s.layout is None for layer in self.experts for rec in layer
                   for s in rec.sections)

    def _shape(self, layer: int, j: int) -> tuple[torch.Size, torch.dtype]:
        tpl = self.templates[layer]
        t = (tpl.w_in_EDI, tpl.w_out_EFD, tpl.b_in_EI, tpl.b_out_ED)[j]
        return t.shape[1:], t.dtype

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor | None, ...]:
        """(w_in_DI, w_out_FD, b_in_I, b_out_D) of one expert, unpacked into new CPU tensors."""
        out: list[torch.Tensor | None] = [None] * 4
        buf = self.buffers[layer]
        for s in self.experts[layer][e].sections:
            shape, dtype = self._shape(layer, s.tensor)
            t = torch.empty(shape, dtype=dtype)
            self._write(buf, s, t)
            out[s.tensor] = t
        return tuple(out)

    @staticmethod
    def _write(src: torch.Tensor, s: _Section, dst: torch.Tensor, at: int | None = None
               ) -> None:
        """Section `s` of `src` into `dst`; packed bytes read from `src[at:]` when given."""
        if s.layout is not None:
            begin = s.offset if at is None else at
            unpack_bf16(src[begin:begin + s.nbytes], s.layout, dst)
        else:
            raw = src[s.offset:s.offset + s.nbytes].view(dst.dtype).view(dst.shape)
            dst.copy_(raw, non_blocking=True)

    def copy_expert(self, layer: int, e: int, dsts: tuple[torch.Tensor | None, ...]) -> int:
        """Issue one expert's copy into `dsts` (a cache slot's views) on the current stream:
        its packed bytes into the staging buffer, their unpacking into the slot, raw tensors
        straight in; returns the bytes that crossed the link."""
        rec, buf = self.experts[layer][e], self.buffers[layer]
        if self.staging is None:  # the CPU: unpack in place
            for s in rec.sections:
                self._write(buf, s, dsts[s.tensor])
        else:
            n = rec.packed_end - rec.start
            if n:
                self.staging[:n].copy_(buf[rec.start:rec.packed_end], non_blocking=True)
            for s in rec.sections:
                self._write(self.staging if s.layout is not None else buf, s, dsts[s.tensor],
                            at=s.offset - rec.start)
        return rec.packed_end - rec.start + rec.raw_bytes
