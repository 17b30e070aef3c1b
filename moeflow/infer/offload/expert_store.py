"""Where offloaded experts live: host memory, pinned when copies go to a CUDA device.

Pinned (page-locked) memory is what lets `copy_(non_blocking=True)` run as a DMA on a side stream
at full PCIe/NVLink-C2C bandwidth without the CPU in the loop; pageable memory is staged through
a bounce buffer synchronously. The store takes each layer's expert tensors over one layer at a
time (pinned copy, then the original is dropped by the caller), so converting a model in host
RAM needs one layer's experts of headroom, not a second copy of the model.

For models larger than host RAM, expert_store="mmap" serves the experts straight from the
checkpoint's files instead (moeflow.infer.offload.mapped_store: memory-mapped views, paged in
on a miss through a pinned double buffer); expert_store="packed" holds them packed to 12 bits
per bf16 weight, losslessly, so a miss copies 3/4 of the bytes
(moeflow.infer.offload.packed_store). Every store answers `kind`, `expert(layer, e)` (the
tensors the CPU paths read), `copy_expert` (the cache's copy into a slot), `num_layers`,
`num_experts`, `templates`, `dtype` and `total_bytes`.

Legend: E experts of a layer, D model dim, F expert ffn dim, I = F or 2F (SwiGLU gate|up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.infer.offload.host_memory import pinned_buffer


@dataclass(frozen=True)
class LayerExperts:
    w_in_EDI: torch.Tensor
    w_out_EFD: torch.Tensor
    b_in_EI: torch.Tensor | None
    b_out_ED: torch.Tensor | None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w_in_EDI, self.w_out_EFD, self.b_in_EI, self.b_out_ED)
                     if t is not None)


def expert_bytes(layer: LayerExperts) -> int:
    """Bytes of one expert: every projection and bias."""
    return sum(t[0].numel() * t.element_size() for t in layer.tensors())


class ExpertStore:
    """All MoE layers' experts in host memory, indexed by (MoE layer, expert)."""

    kind = "pinned"

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.layers: list[LayerExperts] = []
        self._bases: list[torch.Tensor] = []  # the pinned buffers the layers' tensors view

    def add_layer(self, w_in_EDI: torch.Tensor, w_out_EFD: torch.Tensor,
                  b_in_EI: torch.Tensor | None, b_out_ED: torch.Tensor | None) -> int:
        """Keep a host copy of one layer's experts (pinned if `pin`); returns its index."""
        self.layers.append(LayerExperts(*(None if t is None else self._host(t)
                                          for t in (w_in_EDI, w_out_EFD, b_in_EI, b_out_ED))))
        return len(self.layers) - 1

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not self.pin:
            return t.to("cpu").contiguous()
        # Exact-size page-locked memory (torch's pinned allocator would round a Mixtral
        # layer's 1.75 GiB w_in up to 2 GiB); the base is kept: freeing it unregisters it.
        base = pinned_buffer(t.numel() * t.element_size(), pin=True)
        self._bases.append(base)
        out = base.view(t.dtype).view(t.shape)
        out.copy_(t)
        return out

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor | None, ...]:
        """(w_in_DI, w_out_FD, b_in_I, b_out_D) of one expert, views into host memory."""
        le = self.layers[layer]
        return tuple(None if t is None else t[e]
                     for t in (le.w_in_EDI, le.w_out_EFD, le.b_in_EI, le.b_out_ED))

    def copy_expert(self, layer: int, e: int, dsts: tuple[torch.Tensor | None, ...]) -> int:
        """Issue the copies of one expert into `dsts` (a cache slot's views) on the current
        stream, asynchronous from pinned memory; returns their bytes."""
        src = self.expert(layer, e)
        for d, s in zip(dsts, src):
            if d is not None:
                d.copy_(s, non_blocking=True)
        return sum(s.numel() * s.element_size() for s in src if s is not None)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def templates(self) -> list[LayerExperts]:
        """Each layer's experts (their shapes and dtype are what a new cache needs)."""
        return self.layers

    def num_experts(self, layer: int) -> int:
        return self.layers[layer].w_in_EDI.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts are served (and computed on the CPU) in."""
        return self.layers[0].w_in_EDI.dtype

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for le in self.layers for t in le.tensors())
