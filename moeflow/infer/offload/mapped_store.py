"""Experts served straight from the checkpoint's files, memory-mapped (expert_store="mmap").

The store behind the expert cache when the model's experts do not fit host RAM either: the
model comes from `load_model(DIR, map_experts=True)` (what `--expert-store mmap` loads), whose
MoE layers hold `MappedExperts`, per-expert views of the checkpoint's safetensors files
(moeflow.checkpoint.mapped). This store keeps those views, so nothing of the experts is read
when the engine starts; a miss reads one expert's pages, once, through the pinned double
buffer of moeflow.infer.offload.staged_copy on its way to the cache slot. Host RAM then holds
the non-expert weights, two staging buffers and whatever experts the kernel's page cache keeps
(clean pages it can drop at any time); a cold expert costs the disk's read.

Same interface as ExpertStore (moeflow.infer.offload.expert_store): `expert(layer, e)` for the
CPU paths (views of the mapped pages, in the stored dtype: `cpu_dtype` says what to compute in),
`copy_expert` for the cache, `num_layers`, `num_experts`, `total_bytes`.

Legend: E experts of a layer, D model dim, F expert ffn dim, I = F or 2F.
"""

from __future__ import annotations

import torch

from moeflow.infer.offload.expert_store import LayerExperts
from moeflow.infer.offload.staged_copy import CHUNK_BYTES, StagedCopy


class MappedExpertStore:
    kind = "mmap"

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.pin = False
        self.staging = StagedCopy(device, chunk_bytes)
        self.layers: list[list[tuple[torch.Tensor | None, ...]]] = []  # [layer][e] -> views
        self.templates: list[LayerExperts] = []  # [layer] -> shapes and dtype (`template`)
        self.dtype: torch.dtype | None = None  # the served dtype (the cache's, the CPU's)

    def add_layer(self, mapped) -> int:
        """Keep the views of one layer's `MappedExperts`; returns the layer's index."""
        if self.dtype is not None and mapped.dtype != self.dtype:
            raise ValueError(f"mapped experts: MoE layer {len(self.layers)} serves "
                             f"{mapped.dtype}, the first layer {self.dtype}")
        self.dtype = mapped.dtype
        self.layers.append(list(mapped.experts))
        self.templates.append(template(mapped))
        return len(self.layers) - 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_experts(self, layer: int) -> int:
        return len(self.layers[layer])

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor | None, ...]:
        """(w_in_DI, w_out_FD, b_in_I, b_out_D) of one expert: views of the mapped file."""
        return self.layers[layer][e]

    def copy_expert(self, layer: int, e: int, dsts: tuple[torch.Tensor | None, ...]) -> int:
        """Copy one expert into `dsts` (a cache slot's views) through the staging buffers, on
        the current stream; returns the bytes read from the mapping."""
        src = self.expert(layer, e)
        self.staging.copy([(d, s) for d, s in zip(dsts, src) if d is not None])
        return sum(s.numel() * s.element_size() for s in src if s is not None)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for ex in layer
                   for t in ex if t is not None)


def template(mapped) -> LayerExperts:
    """Shapes and served dtype of a `MappedExperts` layer as a LayerExperts of meta tensors
    (the budget plan and the cache's pool read only those)."""
    E = mapped.num_experts

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty(E, *t.shape, dtype=mapped.dtype,
                                                  device="meta")

    return LayerExperts(*(meta(t) for t in mapped.experts[0]))
