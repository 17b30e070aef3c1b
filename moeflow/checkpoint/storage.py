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
import struct
import warnings
from dataclasses import dataclass
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
from moeflow.checkpoint.errors import CheckpointError, reading

SUFFIX = ".safetensors"
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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


@dataclass(frozen=True)
class Piece:
    """One file's part of a stored tensor, as its header describes it (no data read)."""

    file: Path
    offsets: tuple[int, ...]  # where it starts in the global tensor (DCP_SHARDING_INFO)
    shape: tuple[int, ...]
    dtype: torch.dtype
    span: tuple[int, int]  # its bytes [begin, end) in the file


def _header(path: Path) -> tuple[int, dict]:
    """(length, JSON header) of a safetensors file that safetensors itself has accepted."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def stored_pieces(path: Path) -> dict[str, list[Piece]]:
    """{name: its pieces over the files of directory `path`}, from the headers (no tensor data
    is read). CheckpointError naming the directory if it is missing, or the file whose header
    cannot be parsed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} is missing")
    out: dict[str, list[Piece]] = {}
    for f in files(path):
        with reading(f):
            with safe_open(str(f), framework="pt") as st:  # validates header against the size
                names = list(st.keys())
            n, header = _header(f)
            start = 8 + n
            info = json.loads((header.get("__metadata__") or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in names:
                entry = header[key]
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {key!r} has dtype {entry['dtype']}, which moeflow "
                                     f"does not read")
                shape = tuple(entry["shape"])
                at = tuple(info.get(key, {}).get("saved_offsets", [0] * len(shape)))
                if len(at) != len(shape) or not all(type(a) is int and a >= 0 for a in at):
                    raise ValueError(f"tensor {key!r}: DCP_SHARDING_INFO offsets {list(at)} do "
                                     f"not fit its shape {list(shape)}")
                begin, end = entry["data_offsets"]
                out.setdefault(key, []).append(Piece(f, at, shape, _DTYPES[entry["dtype"]],
                                                     (start + begin, start + end)))
    return out


def _global(parts: list[Piece]) -> tuple[int, ...]:
    """The smallest global shape holding every piece."""
    return tuple(max(n) for n in zip(*(tuple(a + s for a, s in zip(p.offsets, p.shape))
                                       for p in parts)))


def stored_tensors(path: Path, stored: dict[str, list[Piece]] | None = None
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (global shape, dtype)} from the files' headers (no tensor data is read), or from
    their `stored` pieces; a file that cannot be parsed raises CheckpointError naming it."""
    stored = stored_pieces(path) if stored is None else stored
    return {k: (_global(v), v[0].dtype) for k, v in stored.items()}


def check_stored(path: Path, want: dict[str, tuple[tuple[int, ...], str | None]] | None,
                 source: Path) -> dict[str, list[Piece]]:
    """The pieces stored in directory `path`, checked to make up whole tensors: with `want`
    ({name: (global shape, dtype name or None)}, what `source` says is stored) every one of
    them and nothing else; without it, whatever is stored. CheckpointError in one line naming
    the tensor (and the file whose header differs) otherwise, before any data is read: a piece
    of another shape or dtype, a tensor no file holds, one only partly held (a file missing)."""
    stored = stored_pieces(path)
    if want is None:
        want = {k: (_global(v), None) for k, v in stored.items()}
    for name, (shape, dtype) in want.items():
        parts = stored.get(name)
        if not parts:
            held = "no" if stored else f"no {SUFFIX} file, so no"
            raise CheckpointError(f"checkpoint directory {path} holds {held} data of tensor "
                                  f"{name!r} {list(shape)}, which {source} lists: a file is "
                                  f"missing or damaged")
        volume = 0
        for p in parts:
            where = f" at offsets {list(p.offsets)}" if any(p.offsets) else ""
            if len(p.offsets) != len(p.shape) or len(p.shape) != len(shape) or any(
                    a < 0 or a + n > m for a, n, m in zip(p.offsets, p.shape, shape)):
                raise CheckpointError(f"checkpoint file {p.file} does not fit {source}: tensor "
                                      f"{name!r} has shape {list(p.shape)}{where} in the file but "
                                      f"{list(shape)} in the manifest")
            have = str(p.dtype).removeprefix("torch.")
            if dtype is not None and have != dtype:
                raise CheckpointError(f"checkpoint file {p.file} does not fit {source}: tensor "
                                      f"{name!r} is {have} in the file but {dtype} in the manifest")
            volume += math.prod(p.shape)
        starts = [p.offsets for p in parts]
        if len(parts) == 1 and parts[0].shape != tuple(shape):
            p = parts[0]
            raise CheckpointError(f"checkpoint file {p.file} does not fit {source}: tensor "
                                  f"{name!r} has shape {list(p.shape)} in the file but "
                                  f"{list(shape)} in the manifest")
        if volume != math.prod(shape) or len(set(starts)) != len(starts):
            raise CheckpointError(f"checkpoint directory {path} holds {volume} elements of tensor "
                                  f"{name!r} {list(shape)} ({math.prod(shape)}) in "
                                  f"{len(parts)} pieces: a file is missing, damaged or left "
                                  f"by another save")
    extra = sorted(set(stored) - set(want))
    if extra:
        raise CheckpointError(f"checkpoint file {stored[extra[0]][0].file} does not fit "
                              f"{source}: it holds tensor {extra[0]!r}, which the manifest "
                              f"does not list")
    return stored


def spans_read(stored: dict[str, list[Piece]], chunks: dict[str, Chunks]
               ) -> dict[Path, list[tuple[int, int]]]:
    """{file: byte spans} of the stored pieces that reading `chunks` uses: of a piece that
    overlaps a chunk, the rows (first axis; rows are contiguous) of the overlap."""
    out: dict[Path, list[tuple[int, int]]] = {}
    for name, c in chunks.items():
        for p in stored.get(name, ()):
            for q in pieces(c):
                if not p.shape:
                    out.setdefault(p.file, []).append(p.span)
                elif all(a < b + m and b < a + n for a, n, b, m in
                         zip(p.offsets, p.shape, q.offsets, q.local.shape)):
                    lo = max(p.offsets[0], q.offsets[0]) - p.offsets[0]
                    hi = min(p.offsets[0] + p.shape[0], q.offsets[0] + q.local.shape[0]) \
                        - p.offsets[0]
                    row = (p.span[1] - p.span[0]) // p.shape[0]
                    out.setdefault(p.file, []).append((p.span[0] + lo * row,
                                                       p.span[0] + hi * row))
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
    checked names and shapes against the files' headers (check_stored): DCP leaves a chunk's
    elements that no stored piece holds as they were."""
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
