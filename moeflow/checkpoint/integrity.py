"""The files of a checkpoint, listed with their sizes and CRC32s: what tells a damaged file from a
good one.

A safetensors header describes its tensors; nothing in the format checks their bytes, so data
garbled inside a file (a failing disk, a copy cut short and padded, a hand edit) would read as
weights, and a deleted file of several would go unnoticed where the others still cover its
tensors' names. Format-2 checkpoints therefore list their safetensors files in manifest.json
(`FILES`, added to format version 2 without changing it: readers that predate it ignore it):

    "files": {"model/shard-00001-model-00001-of-00001.safetensors":
                  {"bytes": 10628056, "block": 67108864, "crc32": ["1a2b3c4d", ...]}, ...}

one CRC32 per `block` bytes of the file, computed right after it is written by the rank that
wrote it (`record`: each rank its own files, in threads; zlib's CRC32 runs at ~2 GB/s a core
and releases the GIL). Loading checks that every listed file is there and that no unlisted one
lies beside them (`check_listed`), then, once the headers are found to fit the manifest
(moeflow.checkpoint.storage.check_stored, whose errors name the tensor), each file's size and
the CRC32 of the blocks it is about to read (`verify`): all of them for a whole model; for a
shard, those of its share and the first block (the header) of each file it reads. Checkpoints
written before the list existed load as before, checked against their files' headers only.
Memory-mapped experts (moeflow.checkpoint.mapped) are not verified: they are read when served,
and reading them all at load is what mapping them avoids.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moeflow.checkpoint.errors import CheckpointError, reading
from moeflow.checkpoint.storage import files

FILES = "files"
BLOCK = 64 << 20  # bytes per CRC32: a shard's rows of a large tensor are verified on their own
_READ = 8 << 20  # bytes read at a time


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _crc(path: Path, begin: int, end: int) -> int:
    crc = 0
    with reading(path), open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            data = f.read(min(_READ, left))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            left -= len(data)
    return crc


def _name(f: Path, root: Path) -> str:
    return f.relative_to(root).as_posix()


def describe(paths: list[Path], root: Path) -> dict[str, dict]:
    """{path relative to `root`: {"bytes", "block", "crc32"}} of these files."""
    sizes = {f: f.stat().st_size for f in paths}
    jobs = [(f, b, min(b + BLOCK, n)) for f, n in sizes.items() for b in range(0, n, BLOCK)]
    with ThreadPoolExecutor(_threads()) as pool:
        crcs = list(pool.map(lambda job: _crc(*job), jobs))
    out = {_name(f, root): {"bytes": n, "block": BLOCK, "crc32": []} for f, n in sizes.items()}
    for (f, _, _), crc in zip(jobs, crcs):
        out[_name(f, root)]["crc32"].append(f"{crc:08x}")
    return out


def record(root: Path, sub: str, group=None, rank: int = 0) -> dict[str, dict]:
    """The `FILES` entries of the safetensors files in `root/sub`, just written (collective over
    `group`, None: this process alone): each rank describes the files DCP named after it
    (`shard-<group rank + 1>-...`), rank 0 gathers them and describes any other; rank 0 gets
    them all, the others {}."""
    directory = Path(root) / sub
    if group is None:
        return describe(files(directory), root)
    import torch.distributed as dist

    mine = f"shard-{dist.get_rank(group) + 1:05d}-"
    own = describe([f for f in files(directory) if f.name.startswith(mine)], root)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, own, group=group)
    if rank != 0:
        return {}
    out = {k: v for part in gathered for k, v in part.items()}
    out.update(describe([f for f in files(directory) if _name(f, root) not in out], root))
    return dict(sorted(out.items()))


def _entries(listed, sub: str, manifest: Path) -> dict[str, dict]:
    """The well-formed `FILES` entries under `sub`; CheckpointError naming the manifest."""
    out = {}
    with reading(manifest):
        if not isinstance(listed, dict):
            raise ValueError(f"{FILES!r} is not a JSON object")
        for key, v in listed.items():
            parts = Path(key).parts
            if not parts or parts[0] != sub:
                continue
            if (".." in parts or not isinstance(v, dict) or type(v.get("bytes")) is not int
                    or type(v.get("block")) is not int or v["block"] <= 0
                    or not isinstance(v.get("crc32"), list)
                    or len(v["crc32"]) != -(-v["bytes"] // v["block"])):
                raise ValueError(f"{FILES!r} entry {key!r} is malformed")
            out[key] = v
    return out


def check_listed(root: Path, sub: str, listed, manifest: Path) -> None:
    """Every file the manifest lists under `sub` is there, and no other safetensors file is
    beside them (DCP would read it). Nothing to check without a list."""
    if listed is None:
        return
    entries = _entries(listed, sub, manifest)
    if not entries:
        return
    for key in entries:
        if not (Path(root) / key).is_file():
            raise CheckpointError(f"checkpoint file {Path(root) / key} is missing ({manifest} "
                                  f"lists it)")
    for f in files(Path(root) / sub):
        if _name(f, root) not in entries:
            raise CheckpointError(f"checkpoint file {f} is not one of the files {manifest} "
                                  f"lists (left by another save or copied in?): move it away")


def verify(root: Path, sub: str, listed, spans: dict[Path, list[tuple[int, int]]],
           manifest: Path) -> None:
    """Check the size of every file listed under `sub`, then the CRC32 of every listed block
    that the byte `spans` ({file: [(begin, end)]}) touch and of each such file's first block
    (its header); CheckpointError naming the file (and the bytes) that differ. Nothing to
    check without a list."""
    if listed is None:
        return
    entries = _entries(listed, sub, manifest)
    for key, entry in entries.items():
        f = Path(root) / key
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is damaged or truncated ({size} bytes; "
                                  f"{manifest} records {entry['bytes']})")
    jobs = []
    for f, ranges in spans.items():
        entry = entries.get(_name(f, root))
        if entry is None:
            continue
        block, crcs = entry["block"], entry["crc32"]
        todo = {0} | {b for a, e in ranges if e > a
                      for b in range(a // block, (e - 1) // block + 1)}
        jobs += [(f, b * block, min((b + 1) * block, entry["bytes"]), crcs[b])
                 for b in sorted(todo) if b < len(crcs)]
    with ThreadPoolExecutor(_threads()) as pool:
        got = list(pool.map(lambda job: _crc(*job[:3]), jobs))
    for (f, a, e, want), crc in zip(jobs, got):
        if f"{crc:08x}" != str(want).lower():
            raise CheckpointError(f"checkpoint file {f} is damaged: its bytes {a}-{e - 1} do not "
                                  f"match their CRC32 in {manifest}")
