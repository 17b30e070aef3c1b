"""Loading and saving whole checkpoints: moeflow's own layout and HF transformers' layout.

moeflow layout: moeflow's one checkpoint format (moeflow/checkpoint/model_dir.py: manifest.json,
config.json, model/ safetensors); a training checkpoint (moeflow/train/checkpoint.py) is one such
directory with the trainer's state beside. Directories written before it (config.json and
model.safetensors holding the state dict) still load.
HF layout: config.json with a `model_type` from HF_MODEL_TYPES or HF_DENSE_MODEL_TYPES plus
(sharded) safetensors; a GPT-family export also holds its remote-code file (hf_config's
docstring says why).
`find_model_dir` is the one answer to "which directory holds the model" for `moeflow serve`,
`generate` and `convert`: a training run, its checkpoints/ directory, a step_* checkpoint, or a
moeflow or HF checkpoint directory.

`from_pretrained` tells the layouts apart by config.json and returns an eval-mode Transformer,
or raises naming what is unsupported, missing or unexpected. HF routers are dropless by their
config; a moeflow checkpoint routes as its config says, and `model(ids, inference=True)` (what
the engine runs) routes any model dropless.

The model is built on the meta device and the checked tensors are assigned to it, so nothing is
allocated twice and no parameter keeps a random value.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from moeflow.checkpoint.errors import CheckpointError, reading
from moeflow.checkpoint.model_dir import MANIFEST, load_model, write_weights
from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.interop.hf_config import (GPT_MODEL_TYPE, GPT_REMOTE_CODE, config_from_hf,
                                       config_to_hf, hf_model_type, is_moeflow_config)
from moeflow.interop.hf_weights import (SafetensorsDir, hf_to_moeflow, moeflow_to_hf,
                                        save_safetensors_dir)
from moeflow.model import Transformer

# Kept in fp32 whatever the load dtype: the router adds it to fp32 scores.
_FP32_BUFFERS = ("router.expert_bias",)

TRAIN_MARKER = "run.json"   # written with every training checkpoint, absent from exports
TRAINING = "moeflow-train"


@dataclass(frozen=True)
class ModelDir:
    """A directory holding config.json and the weights, and what wrote it."""

    path: Path
    kind: str  # TRAINING (a training checkpoint), "moeflow" (an export) or a HF model_type

    @property
    def is_training(self) -> bool:
        return self.kind == TRAINING


def find_model_dir(path: str | Path) -> ModelDir:
    """The checkpoint directory `path` names: a training run (its latest checkpoint), its
    checkpoints/ directory, one step_* checkpoint, or a moeflow or HF checkpoint directory.
    ValueError naming the problem if it is none of them."""
    from moeflow.train.checkpoint import resolve_checkpoint

    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise ValueError(f"model directory {str(path)!r} {what}")
    if not (path / "config.json").is_file() or (path / TRAIN_MARKER).is_file():
        return ModelDir(resolve_checkpoint(path), TRAINING)
    _, model_type = read_config(path)
    return ModelDir(path, model_type or "moeflow")


def json_object(path: Path) -> dict:
    """The JSON object in an optional side file of a checkpoint (tokenizer_config.json,
    generation_config.json, ...): {} when the file is absent or holds no object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def read_config(path: str | Path) -> tuple[ModelConfig, str | None]:
    """(config, HF model_type or None for a moeflow checkpoint) of a checkpoint directory.
    ValueError naming config.json for a file that is not JSON, a field missing or of the wrong
    type (CheckpointError) or a value moeflow does not support."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (not a checkpoint directory)")
    with reading(cfg_file):
        data = json.loads(cfg_file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    try:
        if is_moeflow_config(data):
            return ModelConfig.from_dict(data), None
        model_type = hf_model_type(data)
        return config_from_hf(data), model_type
    except KeyError as e:
        kind = data.get("model_type")
        needs = f", which model_type {kind!r} needs" if kind else ""
        raise CheckpointError(f"checkpoint file {cfg_file} has no field {e.args[0]!r}{needs}"
                              ) from None
    except (TypeError, AttributeError) as e:  # a field of another type: "'str' object has ..."
        raise CheckpointError(f"checkpoint file {cfg_file} has a field of the wrong type "
                              f"({type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(cfg_file) in str(e):
            raise
        raise ValueError(f"{cfg_file}: {e}") from None


def _moeflow_state(config: ModelConfig, weights: SafetensorsDir, where: str
                   ) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    available = set(weights.keys())
    missing = sorted(set(expected) - available)
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r} in {where} ({len(missing)} missing)")
    extra = sorted(available - set(expected) - {"lm_head.weight"})
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r} in {where} ({len(extra)} unused)")
    return {name: weights.get(name) for name in expected}


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """Load a moeflow or HF (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3; dense Llama, Qwen2)
    checkpoint directory, or a training run (its latest checkpoint) as find_model_dir finds it."""
    path = find_model_dir(path).path
    config, model_type = read_config(path)
    if model_type is None and (path / MANIFEST).is_file():
        return load_model(path, device, dtype)
    weights = SafetensorsDir(path)
    where = str(path)
    if model_type is None:
        state = _moeflow_state(config, weights, where)
    else:
        state = hf_to_moeflow(config, model_type, weights.keys(), weights.get, where)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    for name, t in state.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(t.shape)}, the config "
                             f"needs {tuple(want.shape)}")
        if name.endswith(_FP32_BUFFERS):
            state[name] = t.to(device=device, dtype=torch.float32)
        else:
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.is_meta]
    if left:
        raise ValueError(f"tensor {left[0]!r} was not loaded from {where}")
    return model.eval()


def load_model_dir(path: str | Path, device: torch.device | str = "cpu"
                   ) -> tuple[Transformer, BPETokenizer | None, Path]:
    """(eval-mode model, its tokenizer or None, the directory holding its tokenizer files) of
    any directory `find_model_dir` accepts: what `train --init` and `upcycle` start from."""
    from moeflow.train import checkpoint as ckpt_io

    found = find_model_dir(path)
    if found.is_training:
        model, tokenizer = ckpt_io.load_for_inference(found.path, device)
        return model, tokenizer, found.path
    tok_file = found.path / "tokenizer.json"
    tokenizer = BPETokenizer.from_file(tok_file) if tok_file.is_file() else None
    if tokenizer is not None and tokenizer.token_id("<|endoftext|>") is not None:
        tokenizer = BPETokenizer.load(tok_file)  # moeflow's own: end-of-text ends documents
    return from_pretrained(found.path, device=device), tokenizer, found.path


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write `model` in moeflow's one checkpoint format (moeflow.checkpoint.model_dir)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_weights(path, model, max_file_bytes=max_shard_bytes)


def save_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 5 << 30,
            token_ids: Mapping[str, Any] | None = None) -> str:
    """Write `model` as a HF transformers checkpoint; returns the model_type chosen.
    `token_ids` (bos_token_id, eos_token_id, pad_token_id) go into config.json."""
    hf_config = config_to_hf(model.config)
    model_type = hf_config["model_type"]
    tensors = moeflow_to_hf(model.config, model_type, model.state_dict())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    hf_config.update(token_ids or {})
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if model_type == GPT_MODEL_TYPE:
        shutil.copyfile(Path(__file__).with_name(GPT_REMOTE_CODE), path / GPT_REMOTE_CODE)
    save_safetensors_dir(tensors, path, max_shard_bytes)
    return model_type
