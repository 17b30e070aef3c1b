"""A checkpoint's expert tensors as views of its files' pages, for models larger than host RAM.

`load_model(DIR, map_experts=True)` (moeflow.checkpoint.model_dir) reads every tensor of the
model as usual except the experts: each MoE layer's `Experts` becomes a `MappedExperts`, which
holds, per expert, zero-copy views of the safetensors files the checkpoint already has. Nothing
of the experts is read at load: the kernel pages an expert in when something reads its view
(the offload engine's copy to a cache slot, or a CPU-computed miss), keeps the pages in its page
cache while memory allows and drops them, clean, under pressure. So a model whose experts
exceed host RAM serves, with host RAM holding the non-expert weights and whatever experts the
page cache keeps.

Safetensors files are an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and [begin, end) byte range in the data section, then the data, row-major:
a tensor's rows are contiguous. The checkpoint stores each MoE layer's expert tensors stacked
over the layer's E experts (moeflow.checkpoint.chunks), so expert e of a file's piece is one
contiguous range, whatever the expert axis layout of the run that wrote it: one file of all E
rows (a 1-process save, `moeflow convert`), or one piece per rank holding its consecutive
experts (an expert-parallel training run; DCP_SHARDING_INFO in the header says where each piece
starts). An expert-sliced save (each expert's hidden width split over ranks) keeps no expert
contiguous and is refused in one line: load it with the experts in memory
(`--expert-store pinned`).

Files are mapped copy-on-write (mmap.ACCESS_COPY: MAP_PRIVATE, readable and writable): reading
is the same zero-copy page-cache mapping as a read-only one, the file is never written, and an
accidental in-place write costs a private page instead of a SIGSEGV (torch.frombuffer also
warns on a read-only buffer). The views keep their mapping alive; there is no file handle to
close. The files must stay as they are while a model maps them: a file truncated or rewritten
under a mapping faults (SIGBUS) on the next read (training writes each checkpoint to a new
step_* directory, so serving a run's checkpoint while it trains is safe).

Legend: E experts, D model dim, F expert ffn dim, I = F or 2F (SwiGLU gate|up).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeflow.checkpoint.errors import CheckpointError, reading

EXPERT_LEAVES = ("w_in_EDI", "w_out_EFD", "b_in_EI", "b_out_ED")


@dataclass(frozen=True)
class StoredPiece:
    """One file's part of a global tensor: its offsets there and a view of its bytes."""

    offsets: tuple[int, ...]
    view: torch.Tensor  # in the stored shape, backed by the file's mapping


def map_file(path: Path) -> dict[str, StoredPiece]:
    """{tensor name: piece} of one safetensors file, mapped; no tensor data is read."""
    from moeflow.checkpoint.storage import _DTYPES  # imports DCP: only when a file is mapped

    with reading(path):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            size = f.seek(0, 2)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        meta = header.pop("__metadata__", None) or {}
        sharding = json.loads(meta.get("DCP_SHARDING_INFO", "{}"))
        base = torch.frombuffer(mm, dtype=torch.uint8)
        out = {}
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            begin, end = (8 + n + o for o in info["data_offsets"])
            shape = tuple(info["shape"])
            if end > size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: its byte range does not fit the file")
            raw = base[begin:end]
            # view(dtype) needs the offset aligned to the element size; safetensors writers
            # align (the header is padded to 8 bytes), a misaligned file is refused.
            if begin % dtype.itemsize:
                raise ValueError(f"tensor {name!r} starts at byte {begin}, not aligned to "
                                 f"its {dtype}")
            at = tuple(sharding.get(name, {}).get("saved_offsets", [0] * len(shape)))
            out[name] = StoredPiece(at, raw.view(dtype).view(shape))
        return out


def map_weights(weights_dir: Path, names: set[str]) -> dict[str, list[StoredPiece]]:
    """{name: its pieces over the directory's files} for the tensors in `names`."""
    from moeflow.checkpoint.storage import files
    out: dict[str, list[StoredPiece]] = {}
    for f in files(weights_dir):
        for name, piece in map_file(f).items():
            if name in names:
                out.setdefault(name, []).append(piece)
    return out


def expert_views(name: str, pieces: list[StoredPiece], num_experts: int,
                 shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Expert e's view (in the live shape `shape`, e.g. [D, I]) of expert tensor `name` for
    every e, from its pieces; CheckpointError naming the layout if an expert is not one
    contiguous range of one file."""
    views: list[torch.Tensor | None] = [None] * num_experts
    for p in pieces:
        rest = p.view.shape[1:]
        if any(p.offsets[1:]) or rest.numel() != math.prod(shape):
            raise CheckpointError(
                f"checkpoint tensor {name!r} is expert-sliced (stored piece at offsets "
                f"{list(p.offsets)}, shape {list(p.view.shape)}): an expert is not contiguous "
                f"in one file, so it cannot be memory-mapped; serve it with "
                f"--expert-store pinned")
        for r in range(p.view.shape[0]):
            e = p.offsets[0] + r
            if e < num_experts and views[e] is None:
                views[e] = p.view[r].view(shape)
    missing = [e for e, v in enumerate(views) if v is None]
    if missing:
        raise CheckpointError(f"checkpoint tensor {name!r}: no stored piece holds expert "
                              f"{missing[0]}")
    return views


class MappedExperts(nn.Module):
    """A MoE layer's experts as views of the checkpoint's files (no parameters, nothing read).

    Stands where the layer's `Experts` stood, with its description (experts, widths,
    activation, backends) and `dtype`, the dtype the model serves them in: what its parameters
    would have had, `load_model(dtype=...)` or the default dtype, whatever the stored one (the
    copy to the device converts). Only the offload
    engine computes with it (expert_store="mmap", moeflow.infer.offload.mapped_store)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, backends,
                 dtype: torch.dtype, experts: list[tuple[torch.Tensor | None, ...]]) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.backends, self.dtype = activation, backends, dtype
        self.experts = experts  # per expert: (w_in_DI, w_out_FD, b_in_I, b_out_D) views

    def forward(self, x_ND: torch.Tensor, ends_E: torch.Tensor, parked: bool = True):
        raise ValueError("the model's experts are memory-mapped from its checkpoint "
                         "(map_experts=True): serve it with the offload engine, "
                         "OffloadConfig(expert_store='mmap')")


def map_experts(model: nn.Module, path: Path, weights_dir: Path,
                dtype: torch.dtype | None) -> set[str]:
    """Replace every `Experts` of `model` (built on the meta device) by its `MappedExperts`;
    returns the stored names now served from the files (the caller reads the others)."""
    from moeflow.model.experts import Experts

    targets = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    names = {f"{name}.{leaf}" for name, m in targets.items() for leaf in EXPERT_LEAVES
             if getattr(m, leaf) is not None}
    stored = map_weights(weights_dir, names)
    for name, m in targets.items():
        if m.layout is not None:
            raise ValueError(f"{name}: map_experts needs the whole model (an expert-parallel "
                             f"shard reads its own experts)")
        per_leaf = []
        for leaf in EXPERT_LEAVES:
            t = getattr(m, leaf)
            if t is None:
                per_leaf.append([None] * m.num_experts)
                continue
            key = f"{name}.{leaf}"
            if key not in stored:
                raise CheckpointError(f"checkpoint {path} has no tensor {key!r}")
            views = expert_views(key, stored[key], m.num_experts, tuple(t.shape[1:]))
            per_leaf.append(views)
        served = dtype or m.w_in_EDI.dtype  # what load_model gives the other parameters
        mapped = MappedExperts(m.num_experts, m.d_model, m.d_ff, m.activation, m.backends,
                               served, list(zip(*per_leaf)))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mapped)
    return names
