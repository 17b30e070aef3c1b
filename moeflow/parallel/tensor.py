"""Tensor slicing (Megatron-style tensor parallelism) of the dense parts, for inference.

A TP group of `size` ranks holds identical activations; each rank holds 1/size of every sliced
projection:
  * attention: its share of the query heads and of the key/value heads (QKV column-parallel),
    and the matching input columns of the output projection (row-parallel);
  * dense MLPs, shared experts and PR-MoE's residual MLP: 1/size of the hidden width F (first
    projection column-parallel, second row-parallel).
A row-parallel output is a partial sum: one all-reduce over the group completes it, and its bias
is added once, after the reduction (moeflow.model.sliced.row_parallel). Everything else (norms,
embeddings, LM head, routers, the MLA latent projections) is held whole by every rank.

Modules declare which of their tensors are sliced and how (`tp_splits`: leaf name -> (axis,
global section sizes)): a rank holds the `rank`-th 1/size of every section along that axis, so
the query, key and value blocks of a fused QKV weight (or the gate and up halves of a SwiGLU
projection) are each cut in place. `split_chunks` turns that declaration into the checkpoint
chunks the rank reads (moeflow.checkpoint.chunks), so every rank reads only its slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.checkpoint.chunks import Chunk


@dataclass(frozen=True)
class TensorSlice:
    """This rank's place in its tensor-parallel group: the collaborator sliced modules are
    built with (they divide their widths by `size` and call `all_reduce` on partial sums)."""

    size: int
    rank: int
    group: object  # torch.distributed process group of the `size` ranks

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=self.group)
        return partial


def split_chunks(local: torch.Tensor, axis: int, sections: tuple[int, ...], rank: int,
                 size: int) -> tuple[Chunk, ...]:
    """The chunks of a sliced tensor: along `axis`, the global tensor is `sections` blocks and
    the rank holds the rank-th 1/size of each, consecutively (views of `local`)."""
    shape = list(local.shape)
    shape[axis] = sum(sections)
    chunks, at_global, at_local = [], 0, 0
    for n in sections:
        part = n // size
        offsets = [0] * local.dim()
        offsets[axis] = at_global + rank * part
        chunks.append(Chunk(local.narrow(axis, at_local, part), tuple(offsets), tuple(shape)))
        at_global, at_local = at_global + n, at_local + part
    return tuple(chunks)
