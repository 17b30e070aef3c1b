"""Loading and saving whole checkpoints: moeflow's own layout and HF transformers' layout.

moeflow layout: a directory with config.json (ModelConfig.to_dict) and model.safetensors (the
Transformer state dict; a tied lm_head may be left out), sharded with an index past 5 GB.
HF layout: config.json with a `model_type` from HF_MODEL_TYPES or HF_DENSE_MODEL_TYPES plus
(sharded) safetensors. `from_pretrained` tells them apart by config.json and returns an eval-mode
Transformer, or raises naming what is unsupported, missing or unexpected. HF routers are dropless
by their config; a moeflow checkpoint routes as its config says, and `model(ids, inference=True)`
(what the engine runs) routes any model dropless.

The model is built on the meta device and the checked tensors are assigned to it, so nothing is
allocated twice and no parameter keeps a random value.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.interop.hf_config import config_from_hf, config_to_hf, hf_model_type, is_moeflow_config
from moeflow.interop.hf_weights import (SafetensorsDir, hf_to_moeflow, moeflow_to_hf,
                                        save_safetensors_dir)
from moeflow.model import Transformer

# Kept in fp32 whatever the load dtype: the router adds it to fp32 scores.
_FP32_BUFFERS = ("router.expert_bias",)


def read_config(path: str | Path) -> tuple[ModelConfig, str | None]:
    """(config, HF model_type or None for a moeflow checkpoint) of a checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (not a checkpoint directory)")
    data = json.loads(cfg_file.read_text())
    if is_moeflow_config(data):
        return ModelConfig.from_dict(data), None
    model_type = hf_model_type(data)
    return config_from_hf(data), model_type


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
    checkpoint directory."""
    path = Path(path)
    config, model_type = read_config(path)
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
    """(eval-mode model, its tokenizer or None, the directory holding its tokenizer files) from a
    moeflow training run or checkpoint directory (moeflow.train.checkpoint.resolve_checkpoint)
    or a moeflow/HF model directory (`from_pretrained`; tokenizer.json beside it, if any)."""
    from moeflow.train import checkpoint as ckpt_io

    p = Path(path)
    if not p.exists():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    if (p / "config.json").is_file() and not (p / "run.json").is_file():
        tok_file = p / "tokenizer.json"
        tokenizer = BPETokenizer.from_file(tok_file) if tok_file.is_file() else None
        if tokenizer is not None and tokenizer.token_id("<|endoftext|>") is not None:
            tokenizer = BPETokenizer.load(tok_file)  # moeflow's own: end-of-text ends documents
        return from_pretrained(p, device=device), tokenizer, p
    ckpt = ckpt_io.resolve_checkpoint(p)
    model, tokenizer = ckpt_io.load_for_inference(ckpt, device)
    return model, tokenizer, ckpt


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write `model` in moeflow's layout (config.json + safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    save_safetensors_dir(state, path, max_shard_bytes)


def save_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 5 << 30) -> str:
    """Write `model` as a HF transformers checkpoint; returns the model_type chosen."""
    hf_config = config_to_hf(model.config)
    model_type = hf_config["model_type"]
    tensors = moeflow_to_hf(model.config, model_type, model.state_dict())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_safetensors_dir(tensors, path, max_shard_bytes)
    return model_type


def convert(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 << 30) -> str:
    """Convert a checkpoint directory to `to` = "hf" or "moeflow"; returns a one-line summary."""
    if to not in ("hf", "moeflow"):
        raise ValueError(f"to={to!r}: must be 'hf' or 'moeflow'")
    model = from_pretrained(src, dtype=dtype)
    if to == "hf":
        kind = save_hf(model, dst, max_shard_bytes)
    else:
        save_pretrained(model, dst, max_shard_bytes)
        kind = "moeflow"
    return f"{src} -> {dst} ({kind}, {sum(p.numel() for p in model.parameters()):,} parameters)"
