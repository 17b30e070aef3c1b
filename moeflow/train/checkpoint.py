"""Training checkpoints: written by every rank at once, atomic, resumable at any layout.

Layout: OUT/checkpoints/step_00000040/ is a model directory (moeflow.checkpoint.model_dir:
manifest.json, config.json, model/ weights) with the trainer's state beside it:
  trainer/        safetensors, written like the weights: the optimizer state of every parameter
                  (`optim.<parameter>.<state>`, chunked as its parameter, so AdamW moments
                  reload at any EP/DP layout) and rank 0's torch RNG states
  state.json      step, tokens seen, loader position, scheduler position, world size, Python RNG
  tokenizer.json  the run's BPE tokenizer
  run.json        the TrainConfig
and OUT/checkpoints/latest names the newest complete one (lost or dangling, the newest step_*
directory stands in for it, with a warning: `latest_checkpoint`). Every rank writes its own
chunks of the weights and the optimizer state (torch.distributed.checkpoint); nothing is
gathered to one rank, so the checkpoint directory must be on a filesystem every rank reaches.

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
naming the file in one line (moeflow.checkpoint.errors), and so does one that does not fit the
manifest: the weights' and the trainer state's files are listed in it with their sizes and
CRC32s (moeflow.checkpoint.integrity), and their headers must make up whole tensors of the
manifest's shapes, with the RNG state among the trainer's, before anything is read. state.json's
entries are checked for their types. Loading never deletes or rewrites anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeflow.checkpoint.chunks import Chunk, empty_optimizer_chunks, optimizer_chunks, whole
from moeflow.checkpoint.errors import CheckpointError, reading
from moeflow.checkpoint.integrity import FILES, check_listed
from moeflow.checkpoint.model_dir import (CONFIG, LEGACY_WEIGHTS, MANIFEST, WEIGHTS, add_files,
                                          check_fits, format_version, load_config, load_model,
                                          load_weights, read_manifest, read_tensors,
                                          write_weights)
from moeflow.checkpoint.storage import check_stored, stored_tensors, write_chunks
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


def _is_step_name(name: str) -> bool:
    return re.fullmatch(r"step_\d+", name) is not None


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


def _trainer_tensors(ckpt: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (global shape, dtype)} of the trainer state's tensors, checked whole from the
    files' headers; CheckpointError naming the directory when rank 0's file (the RNG states
    and most of the optimizer state) is not among them."""
    check_listed(ckpt, TRAINER, read_manifest(ckpt).get(FILES), ckpt / MANIFEST)
    stored = check_stored(ckpt / TRAINER, None, ckpt / MANIFEST)
    if f"{RNG}torch" not in stored:
        raise CheckpointError(f"checkpoint {ckpt / TRAINER} holds no tensor '{RNG}torch' (the "
                              f"RNG state rank 0 writes with its optimizer state): a trainer "
                              f"state file is missing or damaged")
    return stored_tensors(ckpt / TRAINER, stored)


def restore_rng(ckpt: Path, python_state: list | None) -> None:
    """Every rank takes the RNG states rank 0 saved."""
    stored = _trainer_tensors(ckpt)
    chunks = {k: whole(torch.empty(shape, dtype=dtype)) for k, (shape, dtype) in stored.items()
              if k.startswith(RNG)}
    read_tensors(ckpt, TRAINER, chunks)
    if python_state is not None:
        with reading(ckpt / "state.json"):
            version, internal, gauss = python_state
            state = (version, tuple(internal), gauss)
            random.Random().setstate(state)  # refused here, before any RNG is touched
    torch.set_rng_state(chunks[f"{RNG}torch"].local)
    cuda = [chunks[k].local for k in sorted(chunks) if k.startswith(f"{RNG}cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if python_state is not None:
        random.setstate(state)


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
    manifest = add_files(tmp, TRAINER, group, rank)  # the trainer files' sizes and CRC32s
    final = root / name
    if rank == 0:
        _write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
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


def _no_manifest(path: Path, why: str = "") -> CheckpointError:
    return CheckpointError(f"checkpoint {path}{why} has no {MANIFEST} (deleted or lost), so "
                           f"its files cannot be checked or read; restore it, or name an older "
                           f"step_* checkpoint")


def _warn(message: str) -> None:
    print(f"moeflow: warning: {message}", file=sys.stderr)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `run_dir/checkpoints/latest` names; None when the run has none yet.

    `latest` missing, empty or naming no directory (lost, not written by a save: a save renames
    its directory into place before it moves `latest`) falls back, with a warning, to the
    newest step_* directory. The one chosen must be whole: one without its manifest.json is a
    CheckpointError naming it (not None, which would start the run over and, at that step,
    replace it; nor an older one, which would quietly lose the steps between)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST
    try:
        name = pointer.read_bytes().decode("utf-8", "replace").strip()
    except FileNotFoundError:
        name = None
    if name and _is_step_name(name) and (root / name).is_dir():
        path = root / name
        if not is_checkpoint(path):
            raise _no_manifest(path, f" (named by {pointer})")
        return path
    steps = sorted((p for p in root.glob("step_*") if _is_step_name(p.name) and p.is_dir()),
                   key=_step_of) if root.is_dir() else []
    if not steps:
        if name:
            _warn(f"{pointer} names {name!r}, which is missing, and no step_* checkpoint is "
                  f"left: the run has none")
        return None
    newest = steps[-1]
    if not is_checkpoint(newest):
        raise _no_manifest(newest, f" (the newest; {pointer} names none)")
    what = ("is missing" if name is None else "is empty" if not name else
            f"names {name!r}, which is not a checkpoint directory")
    _warn(f"{pointer} {what}; using the newest checkpoint, {newest}")
    return newest


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
    if any((p / f).exists() for f in (CONFIG, WEIGHTS, TRAINER, "state.json")):
        raise _no_manifest(p)  # the rest of a checkpoint directory
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
    stored = _trainer_tensors(ckpt)  # before anything is read: the trainer state is there
    load_weights(model, ckpt)
    wanted, states = empty_optimizer_chunks(model, optimizers, stored)
    read_tensors(ckpt, TRAINER, wanted)
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
    """state.json, what resuming reads of it checked: CheckpointError naming the file and the
    entry (a value of the wrong type read on would be a traceback, or a run resumed wrongly)."""
    state = load_json(ckpt, "state.json")
    with reading(ckpt / "state.json"):
        for key in ("step", "tokens", "loader"):
            if key not in state:
                raise ValueError(f"no {key!r} entry")
        _entry(state, "step", "a count", _count)
        _entry(state, "tokens", "a count", _count)
        _entry(state, "loader", "an object with a 'consumed' count",
               lambda v: isinstance(v, dict) and _count(v.get("consumed")))
        _entry(state, "scheduler", "an object with 'segments' [[start, end], ...]",
               lambda v: isinstance(v, dict) and (v.get("segments") is None or (
                   isinstance(v["segments"], list) and all(
                       isinstance(x, list) and len(x) == 2 and all(map(_count, x))
                       for x in v["segments"]))))
        _entry(state, "python_rng", "[version, [625 integers], gauss]",
               lambda v: v is None or isinstance(v, list) and len(v) == 3 and isinstance(
                   v[1], list) and all(map(_count, v[1])))
    return state


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _entry(state: dict, key: str, what: str, ok) -> None:
    if key in state and not ok(state[key]):
        shown = json.dumps(state[key])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"entry {key!r} is {shown}, not {what}")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[torch.nn.Module, BPETokenizer]:
    """(model in eval mode, tokenizer) from a checkpoint, run directory or checkpoints dir."""
    ckpt = resolve_checkpoint(path)
    return load_model(ckpt, device), load_tokenizer(ckpt)
