"""Training checkpoints: written by every rank at once, atomic, resumable at any layout.

Layout: OUT/checkpoints/step_00000040/ is a model directory (moeflow.checkpoint.model_dir:
manifest.json, config.json, model/ weights) with the trainer's state beside it:
  trainer/        safetensors, written like the weights: the optimizer state of every parameter
                  (`optim.<parameter>.<state>`, chunked as its parameter, so AdamW moments
                  reload at any EP/DP layout) and rank 0's torch RNG states
  state.json      step, tokens seen, loader position, scheduler position, world size, Python RNG
  tokenizer.json  the run's BPE tokenizer
  run.json        the TrainConfig
and OUT/checkpoints/latest names the newest complete one. Every rank writes its own chunks of
the weights and the optimizer state (torch.distributed.checkpoint); nothing is gathered to one
rank, so the checkpoint directory must be on a filesystem every rank reaches.

Atomicity: rank 0 makes a fresh temporary directory next to the final one; every rank writes
into it (each file fsync'ed); rank 0 writes the JSON files, fsyncs the directories and renames it
into place; only then is `latest` replaced (write temp file, fsync, rename). A process killed at
any instant therefore leaves `latest` pointing at a complete checkpoint; stale temporary
directories are swept by the next save.

Compatibility: before anything is loaded, the manifest's tensor names and global shapes are
compared with the model's; the first difference is reported with both shapes, so loading a
checkpoint into a different config changes nothing.

Safe loading: a checkpoint may come from elsewhere, so nothing in it may run code: it holds only
safetensors and JSON (no pickle). Checkpoints written before this format (format 1:
model.safetensors, optimizer.pt, rng.pt) still serve, generate and teach; resuming one is refused
in one line naming its format version.

Damaged files: any file that cannot be read or parsed raises `CheckpointError`, a ValueError
naming the file in one line (moeflow.checkpoint.errors). Loading never deletes or rewrites
anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeflow.checkpoint.chunks import Chunk, empty_optimizer_chunks, optimizer_chunks, whole
from moeflow.checkpoint.errors import CheckpointError, reading
from moeflow.checkpoint.model_dir import (LEGACY_WEIGHTS, MANIFEST, check_fits, format_version,
                                          load_config, load_model, load_weights, read_manifest,
                                          write_weights)
from moeflow.checkpoint.storage import read_chunks, stored_tensors, write_chunks
from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.train.run_config import TrainConfig

__all__ = ["CheckpointError", "check_compatible", "latest_checkpoint", "load_for_inference",
           "resolve_checkpoint", "save_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAINER = "trainer"
RNG = "rng."


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_chunks() -> dict[str, Chunk]:
    """This process's torch RNG states (CPU, and each CUDA device's) as stored chunks."""
    out = {f"{RNG}torch": whole(torch.get_rng_state())}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{RNG}cuda.{i}"] = whole(s)
    return out


def restore_rng(ckpt: Path, python_state: list | None) -> None:
    """Every rank takes the RNG states rank 0 saved."""
    stored = stored_tensors(ckpt / TRAINER)
    chunks = {k: whole(torch.empty(shape, dtype=dtype)) for k, (shape, dtype) in stored.items()
              if k.startswith(RNG)}
    read_chunks(ckpt / TRAINER, chunks)
    torch.set_rng_state(chunks[f"{RNG}torch"].local)
    cuda = [chunks[k].local for k in sorted(chunks) if k.startswith(f"{RNG}cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer], state: dict[str, Any],
                    tokenizer: BPETokenizer, model_config: ModelConfig, run_config: Any,
                    keep: int = 2, group=None, rank: int = 0) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep`.
    Collective over `group` (None: this process alone): each rank passes its model (shard)
    and its local optimizers (the ones holding its share of the state)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(step)
    tmp = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = [tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)]
    if group is not None:
        dist.broadcast_object_list(tmp, src=0, group=group)
    tmp = Path(tmp[0])
    write_weights(tmp, model, group, rank, trainer_state=TRAINER)
    (tmp / TRAINER).mkdir(exist_ok=True)
    trainer = optimizer_chunks(model, optimizers)
    if rank == 0:
        trainer.update(rng_chunks())
    write_chunks(tmp / TRAINER, trainer, group)
    final = root / name
    if rank == 0:
        py_version, py_internal, py_gauss = random.getstate()
        files = {
            "state.json": {**state, "step": step,
                           "python_rng": [py_version, list(py_internal), py_gauss]},
            "run.json": run_config.to_dict(),
        }
        for filename, payload in files.items():
            _write_bytes(tmp / filename, (json.dumps(payload, indent=2) + "\n").encode())
        _write_bytes(tmp / "tokenizer.json", tokenizer.to_str().encode())
        for d in (tmp / "model", tmp / TRAINER, tmp):
            _fsync_dir(d)
        if final.exists():  # left by a run that died after the rename but before `latest` moved
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / f".{LATEST}.tmp"
        _write_bytes(pointer, (name + "\n").encode())
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep, final)
    if group is not None:
        dist.barrier(group=group)
    return final


def _prune(root: Path, keep: int, latest: Path) -> None:
    done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
    for old in done[:-keep] if keep > 0 else done:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / LEGACY_WEIGHTS).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if is_checkpoint(path) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ directory, or itself."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    for run_dir in (p, p.parent):
        if (run_dir / CHECKPOINTS_DIR).is_dir():
            found = latest_checkpoint(run_dir)
            if found is not None:
                return found
    if not p.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    raise ValueError(f"{str(path)!r} holds no moeflow checkpoint")


def check_resumable(ckpt: Path) -> None:
    """Refuse, in one line naming the format version, a checkpoint this code cannot resume."""
    version = format_version(ckpt)
    if version == 1:
        raise ValueError(f"checkpoint {ckpt} is moeflow checkpoint format version 1 "
                         f"(model.safetensors + optimizer.pt); it still serves, generates and "
                         f"teaches, but resuming needs format version 2: start a new run, e.g. "
                         f"with --teacher {ckpt}")
    if read_manifest(ckpt).get("trainer_state") != TRAINER:  # other versions refused there
        raise ValueError(f"checkpoint {ckpt} holds a model but no trainer state to resume")


def check_compatible(model: torch.nn.Module, ckpt: Path) -> None:
    """Raise ValueError naming the first tensor whose name or shape differs."""
    check_resumable(ckpt)
    check_fits(model, ckpt)


@torch.no_grad()
def load_trainer_state(ckpt: Path, model: torch.nn.Module,
                       optimizers: list[torch.optim.Optimizer]) -> None:
    """Weights and optimizer state into this rank's model (shard) and local optimizers, at
    whatever layout they have now."""
    check_compatible(model, ckpt)
    load_weights(model, ckpt)
    wanted, states = empty_optimizer_chunks(model, optimizers, stored_tensors(ckpt / TRAINER))
    read_chunks(ckpt / TRAINER, wanted)
    for opt, state in zip(optimizers, states):
        opt.load_state_dict(state)


def load_model_config(ckpt: Path) -> ModelConfig:
    return load_config(ckpt)


def load_tokenizer(ckpt: Path) -> BPETokenizer:
    with reading(ckpt / "tokenizer.json"):
        return BPETokenizer.load(ckpt / "tokenizer.json")


def load_json(ckpt: Path, filename: str) -> Any:
    with reading(ckpt / filename):
        data = json.loads((ckpt / filename).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        return data


def load_run_config(ckpt: Path) -> TrainConfig:
    with reading(ckpt / "run.json"):
        return TrainConfig.from_dict(load_json(ckpt, "run.json"))


def load_state(ckpt: Path) -> dict[str, Any]:
    state = load_json(ckpt, "state.json")
    with reading(ckpt / "state.json"):
        for key in ("step", "tokens", "loader"):
            if key not in state:
                raise ValueError(f"no {key!r} entry")
    return state


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[torch.nn.Module, BPETokenizer]:
    """(model in eval mode, tokenizer) from a checkpoint, run directory or checkpoints dir."""
    ckpt = resolve_checkpoint(path)
    return load_model(ckpt, device), load_tokenizer(ckpt)
