"""Chunks to and from safetensors files through torch.distributed.checkpoint (DCP).

Every rank writes its own chunks (moeflow.checkpoint.chunks) into its own files of one directory,
`shard-<rank+1>-model-<i>-of-<n>.safetensors` (DCP's HuggingFaceStorageWriter): nothing is
gathered to one rank. A chunk held by several ranks (dense tensors, replicated experts, scalars)
is written once: DCP's planning drops the duplicates. Each file's header records where its
chunks start in the global tensors (DCP's `DCP_SHARDING_INFO`), so the files need no other index
and no pickle: DCP's own `.metadata` file is a pickle, and a checkpoint may come from elsewhere.

Reading asks for any chunks of the global tensors (`read_chunks`); DCP's resharding reads the
overlapping parts of the stored chunks, so a checkpoint written at one layout reads at any other.
Reads run in each process on its own (no collective): every rank reads what it needs.

Saving is collective over the given process group (None: this process alone).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadPlan, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from moeflow.checkpoint.chunks import Chunk, Chunks, pieces
from moeflow.checkpoint.errors import reading

SUFFIX = ".safetensors"
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class _SavePlanner(DefaultSavePlanner):
    """Writes each chunk at its offsets in its global tensor."""

    def __init__(self, chunks: dict[str, Chunks]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = chunks

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, c in _flat(self.chunks):
            at = torch.Size(c.offsets)
            items.append(WriteItem(
                index=MetadataIndex(fqn, at), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=at, sizes=c.local.shape),
                    properties=TensorProperties.create_from_tensor(c.local),
                    size=torch.Size(c.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        return _at(self.chunks, index).local.contiguous()


class _LoadPlanner(DefaultLoadPlanner):
    """Reads into each chunk the overlapping parts of the stored chunks."""

    def __init__(self, chunks: dict[str, Chunks]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = chunks

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, c in self.chunks.items():
            md = self.metadata.state_dict_metadata[fqn]
            items += create_read_items_for_chunk_list(
                fqn, md, [ChunkStorageMetadata(offsets=torch.Size(p.offsets),
                                               sizes=p.local.shape) for p in pieces(c)])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _at(self.chunks, index).local


def _flat(chunks: dict[str, Chunks]):
    return ((fqn, p) for fqn, c in chunks.items() for p in pieces(c))


def _at(chunks: dict[str, Chunks], index: MetadataIndex) -> Chunk:
    """The chunk of `index.fqn` that starts at `index.offset` (a sliced tensor has several)."""
    parts = pieces(chunks[index.fqn])
    if len(parts) == 1:
        return parts[0]
    return next(p for p in parts if torch.Size(p.offsets) == index.offset)


def files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.name.endswith(SUFFIX))


def stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (global shape, dtype)} from the files' headers (no tensor data is read); a file
    that cannot be parsed raises CheckpointError naming it."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for f in files(path):
        with reading(f), safe_open(str(f), framework="pt") as st:
            info = json.loads((st.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in st.keys():
                sl = st.get_slice(key)
                shape = sl.get_shape()
                at = info.get(key, {}).get("saved_offsets", [0] * len(shape))
                end = tuple(a + n for a, n in zip(at, shape))
                seen = out.get(key, ((0,) * len(end), None))[0]
                out[key] = (tuple(max(a, b) for a, b in zip(seen, end)), _DTYPES[sl.get_dtype()])
    return out


def file_indices(chunks: dict[str, Chunks], max_file_bytes: int) -> dict[str, int]:
    """{name: file number from 1}: consecutive tensors grouped into files of at most
    `max_file_bytes` of global tensor data (a larger tensor gets a file of its own)."""
    out, index, size = {}, 1, 0
    for name, c in chunks.items():
        c = pieces(c)[0]
        n = math.prod(c.shape) * c.local.element_size()
        if size and size + n > max_file_bytes:
            index, size = index + 1, 0
        out[name], size = index, size + n
    return out


def write_chunks(path: Path, chunks: dict[str, Chunks], group=None,
                 max_file_bytes: int | None = None) -> None:
    """Collective over `group` (None: this process alone): every rank writes its chunks into
    `path` (which must exist, on a filesystem every rank reaches); with `max_file_bytes`, into
    several files per rank (every rank must then hold a chunk of every tensor, as every rank
    does of the weights)."""
    cpu = {k: tuple(Chunk(p.local.detach().cpu(), p.offsets, p.shape) for p in pieces(c))
           for k, c in chunks.items()}
    mapping = None if max_file_bytes is None else file_indices(cpu, max_file_bytes)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({k: c[0].local for k, c in cpu.items()},
                 storage_writer=HuggingFaceStorageWriter(str(path), mapping, save_distributed=True),
                 planner=_SavePlanner(cpu), process_group=group, no_dist=group is None)


def read_chunks(path: Path, chunks: dict[str, Chunks]) -> None:
    """Fill every chunk (in place) from the global tensors stored in `path`. The caller has
    checked names and shapes (stored_tensors)."""
    if not chunks:
        return
    for f in files(path):  # name a damaged file before DCP trips over it
        with reading(f), safe_open(str(f), framework="pt"):
            pass
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load({k: pieces(c)[0].local for k, c in chunks.items()},
                 storage_reader=HuggingFaceStorageReader(str(path)),
                 planner=_LoadPlanner(chunks), no_dist=True)
