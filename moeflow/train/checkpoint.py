"""Checkpoints that survive being killed mid-write, and refuse to load into the wrong model.

Layout: OUT/checkpoints/step_00000040/ holds
  model.safetensors   weights (tied tensors stored once)
  optimizer.pt        optimizer state_dict
  state.json          step, tokens seen, loader position, scheduler position, world size
  rng.pt              torch (CPU and CUDA) and Python RNG states
  tokenizer.json      the run's BPE tokenizer
  config.json         the ModelConfig
  run.json            the TrainConfig
and OUT/checkpoints/latest names the newest complete one.

Atomicity: files are written into a fresh temporary directory next to the final one and each
fsync'ed; the directory is fsync'ed and renamed into place; only then is `latest` replaced
(write temp file, fsync, rename). A process killed at any instant therefore leaves `latest`
pointing at a complete checkpoint; stale temporary directories are swept by the next save.

Compatibility: before anything is loaded, the checkpoint's tensor names and shapes (read from
the safetensors header, no data) are compared with the model's; the first difference is
reported with both shapes, so loading a checkpoint into a different config changes nothing.

Safe loading: a checkpoint may come from elsewhere, so nothing in it may run code. Weights are
safetensors (no code by construction); optimizer.pt and rng.pt are read with
`torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers
(dict, list, tuple, str, int, float, bool, None) and refuses every other global. That is all
they hold: AdamW's state_dict (tensors, floats, a betas tuple, bools, None), the parallel
trainer's per-rank list of such dicts with a layout dict of ints and strings, and the RNG
states (torch's ByteTensors and Python's `random.getstate()`, a tuple of ints; no numpy RNG is
captured), so the allow-list of extra globals, SAFE_GLOBALS, is empty and files written before
this change load unchanged. A pickle that names any other global is refused, never executed.

Damaged files: any file of a checkpoint that cannot be read or parsed (truncated, corrupt, not
what it should be) raises `CheckpointError`, a ValueError naming the file in one line, so the
CLI reports it as `moeflow: error: ...` with exit status 2. Loading never deletes or rewrites
anything.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.train.run_config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"
# Globals optimizer.pt and rng.pt may name beyond tensors and plain containers: none (see above).
SAFE_GLOBALS: list = []
LATEST = "latest"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any failure to read or parse `path` into a one-line CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - torch, safetensors, json and tokenizers differ
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        foreign = next((line for line in lines if "GLOBAL" in line), None)
        if isinstance(e, pickle.UnpicklingError) and foreign:  # refused by weights_only=True
            raise CheckpointError(f"checkpoint file {path} holds objects other than tensors "
                                  f"and plain data; refused without running them "
                                  f"({foreign})") from None
        reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
        raise CheckpointError(f"checkpoint file {path} is damaged or truncated "
                              f"({type(e).__name__}: {reason})") from None


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


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, each storage once (a tied head is saved as the embedding only)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, tensors: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any],
                    tokenizer: BPETokenizer, model_config: ModelConfig, run_config: Any,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep`.
    `tensors`: the full model's, each storage once (`model_tensors`, or the parallel trainer's
    gathered shards); `optimizer_state`: what optimizer.pt holds."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    files = {
        WEIGHTS: lambda: safetensors_bytes(tensors, metadata={"step": str(step)}),
        "optimizer.pt": lambda: _torch_bytes(optimizer_state),
        "rng.pt": lambda: _torch_bytes(capture_rng()),
        "state.json": lambda: (json.dumps({**state, "step": step}, indent=2) + "\n").encode(),
        "tokenizer.json": lambda: tokenizer.to_str().encode(),
        "config.json": lambda: (model_config.to_json() + "\n").encode(),
        "run.json": lambda: (json.dumps(run_config.to_dict(), indent=2) + "\n").encode(),
    }
    for filename, payload in files.items():
        _write_bytes(tmp / filename, payload())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # left by a run that died after the rename but before `latest` moved
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST}.tmp"
    _write_bytes(pointer, (name + "\n").encode())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, latest: Path) -> None:
    done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
    for old in done[:-keep] if keep > 0 else done:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / WEIGHTS).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ directory, or itself."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        return p
    for run_dir in (p, p.parent):
        if (run_dir / CHECKPOINTS_DIR).is_dir():
            found = latest_checkpoint(run_dir)
            if found is not None:
                return found
    if not p.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    raise ValueError(f"{str(path)!r} holds no moeflow checkpoint")


def tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    with reading(ckpt / WEIGHTS), safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_compatible(model: torch.nn.Module, ckpt: Path) -> None:
    """Raise ValueError naming the first tensor whose name or shape differs."""
    have = tensor_shapes(ckpt)
    want = {k: tuple(t.shape) for k, t in model_tensors(model).items()}
    for name, shape in want.items():
        if name not in have:
            raise ValueError(f"checkpoint {ckpt} does not fit the model: tensor {name!r} "
                             f"{list(shape)} is missing from the checkpoint")
        if have[name] != shape:
            raise ValueError(f"checkpoint {ckpt} does not fit the model: tensor {name!r} has "
                             f"shape {list(have[name])} in the checkpoint but {list(shape)} "
                             f"in the model")
    extra = [k for k in have if k not in want]
    if extra:
        raise ValueError(f"checkpoint {ckpt} does not fit the model: tensor {extra[0]!r} "
                         f"{list(have[extra[0]])} has no place in the model")


def load_tensors(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors (CheckpointError naming the file if it is damaged)."""
    with reading(ckpt / WEIGHTS):
        return load_file(str(ckpt / WEIGHTS), device=str(device))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    check_compatible(model, ckpt)
    tensors = load_tensors(ckpt, next(model.parameters()).device)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    aliases = set(model.state_dict()) - set(model_tensors(model))
    if unexpected or set(missing) - aliases:
        raise ValueError(f"checkpoint {ckpt}: tensors do not match the model")


def load_model_config(ckpt: Path) -> ModelConfig:
    with reading(ckpt / "config.json"):
        return ModelConfig.from_json((ckpt / "config.json").read_text())


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


def load_torch(ckpt: Path, filename: str) -> Any:
    """optimizer.pt or rng.pt, unpickled without running code (see the module docstring)."""
    with reading(ckpt / filename), torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(ckpt / filename, map_location="cpu", weights_only=True)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[torch.nn.Module, BPETokenizer]:
    """(model in eval mode, tokenizer) from a checkpoint, run directory or checkpoints dir."""
    from moeflow.model import Transformer

    ckpt = resolve_checkpoint(path)
    config = load_model_config(ckpt)
    with torch.device(device):
        model = Transformer(config)
    load_weights(model, ckpt)
    return model.eval(), load_tokenizer(ckpt)
