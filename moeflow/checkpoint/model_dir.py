"""A model directory: moeflow's one checkpoint format (format version 2).

    manifest.json   {"format": "moeflow-checkpoint", "version": 2, "weights": "model",
                     "tensors": {name: {"shape", "dtype"}}, "experts": {...},
                     "files": {"model/<file>": {"bytes", "block", "crc32"}}, ...}
    config.json     the ModelConfig
    model/          the weights: safetensors files, one per writing rank (moeflow.checkpoint
                    .storage), together holding every tensor whole and layout-free
                    (moeflow.checkpoint.chunks: experts stacked by global expert id, a SwiGLU
                    [gate | up] projection with the halves on their own axis)

`moeflow convert --to moeflow` writes exactly this; a training checkpoint
(moeflow.train.checkpoint) is one with the trainer's state beside it. `load_weights` reads the
weights into a model at any layout (a 1-process model, or one rank's shard); `load_model` builds
the model of a directory. The manifest names every stored tensor with its global shape, so a
model that does not fit is refused, naming the first tensor that differs, before anything is
read; so is a manifest its files do not fit: a file missing, truncated or not listed, a header
whose tensor differs from the manifest's (shape, dtype, a part missing) and, for checkpoints
written since the manifest lists its files, bytes that fail their CRC32
(moeflow.checkpoint.integrity). Directories written before the manifest existed (format 1:
one model.safetensors, the model's own state dict) still load for inference
(`load_legacy_weights`); anything newer than this code reads, or not a moeflow checkpoint at all,
is refused in one line naming the version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from moeflow.checkpoint.chunks import global_shapes, model_chunks, tensor_names
from moeflow.checkpoint.errors import reading
from moeflow.checkpoint.integrity import FILES, check_listed, record, verify
from moeflow.checkpoint.storage import check_stored, read_chunks, spans_read, write_chunks
from moeflow.config import ModelConfig
from moeflow.model.experts import Experts

FORMAT = "moeflow-checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model"
LEGACY_WEIGHTS = "model.safetensors"  # format 1: the model's state dict in one file


def format_version(path: Path) -> int | None:
    """2 (or what the manifest says) for a manifest, 1 for a format-1 directory, else None."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, check=False)
        with reading(path / MANIFEST):
            return int(manifest.get("version", 0))
    if (path / LEGACY_WEIGHTS).is_file():
        return 1
    return None


def read_manifest(path: Path, check: bool = True) -> dict[str, Any]:
    with reading(path / MANIFEST):
        data = json.loads((path / MANIFEST).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("tensors", {}), dict):
            raise ValueError("expected a JSON object with a 'tensors' object")
    if check and (data.get("format") != FORMAT or data.get("version") != VERSION):
        raise ValueError(f"checkpoint {path} is {data.get('format')!r} format version "
                         f"{data.get('version')!r}; this moeflow reads {FORMAT!r} version "
                         f"{VERSION}")
    return data


def write_weights(path: Path, model: nn.Module, group=None, rank: int = 0,
                  max_file_bytes: int | None = None, **extra: Any) -> None:
    """Write `model` (one process's, or with `group` every rank's shard; collective) into
    directory `path`: the weights (files of at most `max_file_bytes` per rank), then on rank 0
    the manifest (with `extra` fields) and config.json. `path` must exist, on a filesystem
    every rank reaches."""
    path = Path(path)
    (path / WEIGHTS).mkdir(exist_ok=True)
    chunks = model_chunks(model)
    write_chunks(path / WEIGHTS, chunks, group, max_file_bytes)
    listed = record(path, WEIGHTS, group, rank)
    if rank != 0:
        return
    experts = {name: {"num_experts": m.num_experts, "expert_axis": 0,
                      "gate_up_axis": 2 if m.activation == "swiglu" else None}
               for name, m in model.named_modules() if isinstance(m, Experts)}
    manifest = {"format": FORMAT, "version": VERSION, "weights": WEIGHTS,
                "tensors": {k: {"shape": list(c.shape),
                                "dtype": str(c.local.dtype).removeprefix("torch.")}
                            for k, c in chunks.items()},
                "experts": experts, FILES: listed, **extra}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (path / CONFIG).write_text(model.config.to_json() + "\n")


def add_files(path: Path, sub: str, group=None, rank: int = 0) -> dict[str, Any] | None:
    """List the files just written into `path/sub` (another directory of tensors beside the
    weights, e.g. a training checkpoint's trainer state) in the manifest; collective over
    `group`. Rank 0 gets the updated manifest for the caller to write, the others None."""
    listed = record(path, sub, group, rank)
    if rank != 0:
        return None
    manifest = read_manifest(path)
    manifest[FILES] = dict(sorted({**manifest.get(FILES, {}), **listed}.items()))
    return manifest


def read_tensors(path: Path, sub: str, chunks: dict, want: dict | None = None,
                 manifest: dict | None = None) -> None:
    """Fill `chunks` (in place) from the tensors stored in `path/sub`, after checking, before
    any data is read, that its files are the ones the manifest lists (their sizes; then the
    CRC32 of the bytes to be read: moeflow.checkpoint.integrity) and that their headers make up
    whole tensors (`want`: {name: (shape, dtype)}, those the manifest lists; None: whatever
    is stored)."""
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    listed = manifest.get(FILES)
    check_listed(path, sub, listed, path / MANIFEST)
    stored = check_stored(path / sub, want, path / MANIFEST)
    verify(path, sub, listed, spans_read(stored, chunks), path / MANIFEST)
    read_chunks(path / sub, chunks)


def check_fits(model: nn.Module, path: Path, mapped: set[str] = frozenset()) -> None:
    """Raise ValueError naming the first tensor whose name or stored shape differs; `mapped`:
    stored names the model serves from the files instead (moeflow.checkpoint.mapped)."""
    path = Path(path)
    manifest = read_manifest(path)
    with reading(path / MANIFEST):
        have = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items() if k not in mapped}
    _compare(global_shapes(model), have, path)


def _compare(want: dict, have: dict, where: Path) -> None:
    for name, shape in want.items():
        if name not in have:
            raise ValueError(f"checkpoint {where} does not fit the model: tensor {name!r} "
                             f"{list(shape)} is missing from the checkpoint")
        if have[name] != shape:
            raise ValueError(f"checkpoint {where} does not fit the model: tensor {name!r} has "
                             f"shape {list(have[name])} in the checkpoint but {list(shape)} "
                             f"in the model")
    extra = [k for k in have if k not in want]
    if extra:
        raise ValueError(f"checkpoint {where} does not fit the model: tensor {extra[0]!r} "
                         f"{list(have[extra[0]])} has no place in the model")


@torch.no_grad()
def load_weights(model: nn.Module, path: Path, mapped: set[str] = frozenset()) -> None:
    """Read the weights of directory `path` into `model` (whatever its layout), in place;
    `mapped`: stored names not to read (experts served from the files). The model is checked
    against the manifest, the manifest against the files (read_tensors), before anything is
    read."""
    path = Path(path)
    check_fits(model, path, mapped)
    manifest = read_manifest(path)
    with reading(path / MANIFEST):
        want = {k: (tuple(v["shape"]), v.get("dtype")) for k, v in manifest["tensors"].items()}
    read_tensors(path, WEIGHTS, model_chunks(model), want, manifest)


def load_config(path: Path) -> ModelConfig:
    with reading(path / CONFIG):
        return ModelConfig.from_json((path / CONFIG).read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None,
               build: Callable[[ModelConfig], nn.Module] | None = None,
               map_experts: bool = False) -> nn.Module:
    """The Transformer of a model directory (format 2 or 1), in eval mode. `dtype` casts the
    parameters; buffers (the router's expert bias) stay fp32, as the router adds them to fp32
    scores. `build(config)` makes the model on the meta device (default: the whole
    Transformer); a rank's shard of it (moeflow.parallel.inference) reads only its chunks.
    `map_experts`: leave the experts in the files, memory-mapped, nothing of them read
    (moeflow.checkpoint.mapped; for the offload engine's expert_store="mmap")."""
    from moeflow.checkpoint.mapped import map_experts as map_expert_views
    from moeflow.model import Transformer

    path = Path(path)
    version = format_version(path)
    config = load_config(path)
    if build is not None and version == 1:
        raise ValueError(f"checkpoint {path} is format 1 (one model.safetensors): it loads "
                         f"only whole; rewrite it with `moeflow convert --to moeflow`")
    if map_experts and (version != VERSION or build is not None):
        raise ValueError(f"checkpoint {path}: memory-mapped experts need a whole model of a "
                         f"format-{VERSION} moeflow checkpoint; rewrite it with "
                         f"`moeflow convert --to moeflow`")
    with torch.device("meta"):
        model = Transformer(config) if build is None else build(config)
    mapped: set[str] = set()
    if map_experts:
        read_manifest(path)
        mapped = map_expert_views(model, path, path / WEIGHTS, dtype)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty allocates each parameter anew: share the head again
        model.lm_head.weight = model.tok_emb.weight
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if version == 1:
        load_legacy_weights(model, path)
    else:
        load_weights(model, path, mapped)
    return model.eval()


@torch.no_grad()
def load_legacy_weights(model: nn.Module, path: Path) -> None:
    """Format 1: model.safetensors holds the model's state dict (a tied head once)."""
    file = path / LEGACY_WEIGHTS
    with reading(file), safe_open(str(file), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = model.state_dict()
    _compare({k: tuple(state[k].shape) for k in tensor_names(model).values()}, have, path)
    with reading(file):
        tensors = load_file(str(file))
    for name, t in tensors.items():
        state[name].copy_(t)
