"""What `moeflow serve --model DIR` can load, and how each kind finds its tokenizer.

DIR may be (moeflow.interop.find_model_dir decides, for `generate` and `convert` too)
  * a moeflow training run, its checkpoints/ directory, or one step_* checkpoint in it
    (moeflow/train/checkpoint.py): weights, config.json, and the run's BPE tokenizer.json whose
    `<|endoftext|>` ends generation;
  * a moeflow (`moeflow convert --to moeflow`) or HF MoE checkpoint directory (anything
    `moeflow.from_pretrained` reads, `moeflow convert --to hf` exports included) with a
    `tokenizers` tokenizer.json beside it; the end of sequence comes from
    generation_config.json / config.json `eos_token_id` and tokenizer_config.json
    `eos_token`, the chat template from chat_template.jinja or tokenizer_config.json (chat.py).
With `map_experts` (`--expert-store mmap`) the experts of a moeflow checkpoint (training or
converted) stay in its files, memory-mapped (moeflow.checkpoint.mapped); a HF directory stores
each expert's projections as separate, transposed tensors that are not the slot layout, so it is
refused in one line naming the conversion (`moeflow convert DIR OUT --to moeflow`).
The model comes back in eval mode; the engine routes every forward it runs dropless and without
noise (`inference=True`): at inference no token is dropped for capacity, since a dropped token
would change a user's answer depending on its batch-mates. Each tokenizer file is read once,
into moeflow's one tokenizer class (moeflow.data.tokenizer.BPETokenizer).

On several ranks (`torchrun ... serve --tp T --ep E`, moeflow.parallel.inference),
`load_shard_for_serving` gives each rank its shard of a moeflow checkpoint (training or
converted) or of a HF MoE directory, each rank reading only its slices, and rank 0 also the
tokenizer; the layout is
checked against config.json before any process group starts or any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeflow.data.tokenizer import BPETokenizer
from moeflow.infer.device import resolve_device
from moeflow.interop.pretrained import json_object
from moeflow.serve.chat import ChatTemplate, find_chat_template

if TYPE_CHECKING:
    from moeflow.infer.ranks import StepChannel
    from moeflow.parallel.inference import InferenceParallel


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: BPETokenizer
    chat_template: ChatTemplate
    kind: str               # "moeflow-train" | "moeflow" | HF model_type


def _token_text(value) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def load_for_serving(path: str | Path, device: str = "auto", dtype: str | None = None,
                     map_experts: bool = False) -> LoadedModel:
    """Model + tokenizer + chat template from a checkpoint directory; ValueError if unusable."""
    from moeflow.interop.pretrained import find_model_dir, from_pretrained

    found = find_model_dir(path)
    dev = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if map_experts:
        from moeflow.checkpoint.model_dir import load_model

        if not found.is_training and found.kind != "moeflow":
            raise ValueError(f"--expert-store mmap: {found.path} is a HF {found.kind} "
                             f"directory, whose experts are not stored in the layout the cache "
                             f"copies; convert it first: moeflow convert {found.path} OUT "
                             f"--to moeflow")
        model = load_model(found.path, dev, torch_dtype, map_experts=True)
        if found.is_training:
            from moeflow.train.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(found.path)
        else:
            tokenizer = _hf_tokenizer(found.path)
    elif found.is_training:
        from moeflow.train.checkpoint import load_for_inference

        model, tokenizer = load_for_inference(found.path, device=dev)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    else:
        model = from_pretrained(found.path, dtype=torch_dtype, device=dev)
        tokenizer = _hf_tokenizer(found.path)
    model.eval()
    template = ChatTemplate(find_chat_template(found.path), bos_token=tokenizer.bos_token,
                            eos_token=tokenizer.eos_token)
    return LoadedModel(model=model, tokenizer=tokenizer, chat_template=template, kind=found.kind)


@dataclass(frozen=True)
class LoadedShard:
    loaded: LoadedModel | None  # rank 0: the shard with tokenizer and template; else None
    model: torch.nn.Module  # this rank's shard
    channel: StepChannel  # rank 0 -> the others, for moeflow.infer.Engine
    env: object  # moeflow.parallel.launch.DistEnv


def load_shard_for_serving(path: str | Path, par: InferenceParallel, device: str = "auto",
                           dtype: str | None = None) -> LoadedShard:
    """Start torch.distributed (torchrun's environment) and load this rank's shard; a layout
    that does not fit the model fails in one line first."""
    import os

    import torch.distributed as dist

    from moeflow.checkpoint.model_dir import MANIFEST
    from moeflow.infer.ranks import StepChannel
    from moeflow.interop.pretrained import find_model_dir, read_config
    from moeflow.parallel.inference import check_layout, load_shard
    from moeflow.parallel.launch import init_distributed

    found = find_model_dir(path)
    if found.kind == "moeflow" and not (found.path / MANIFEST).is_file():
        raise ValueError(f"{found.path}: a format-1 moeflow checkpoint loads only whole; "
                         f"rewrite it first: moeflow convert {found.path} OUT --to moeflow")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(read_config(found.path)[0], par, world)
    env = init_distributed(None if device == "auto" else device, timeout_s=par.timeout_s)
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = load_shard(found.path, par, env.device, torch_dtype,
                       ranks_per_node=env.local_world)
    loaded = None
    if env.is_main:
        if found.is_training:
            from moeflow.train.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(found.path)
        else:
            tokenizer = _hf_tokenizer(found.path)
        template = ChatTemplate(find_chat_template(found.path), bos_token=tokenizer.bos_token,
                                eos_token=tokenizer.eos_token)
        loaded = LoadedModel(model, tokenizer, template, found.kind)
    return LoadedShard(loaded, model, StepChannel(dist.group.WORLD, 0, env.device), env)


def _hf_tokenizer(path: Path) -> BPETokenizer:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{path}: no tokenizer.json (a `tokenizers` file is needed to serve)")
    tok_cfg = json_object(path / "tokenizer_config.json")
    tokenizer = BPETokenizer.from_file(tok_file)
    eos_token = _token_text(tok_cfg.get("eos_token"))
    eos = _ids(json_object(path / "generation_config.json").get("eos_token_id"))
    eos += _ids(json_object(path / "config.json").get("eos_token_id"))
    for text in (eos_token, "<|endoftext|>"):
        tid = tokenizer.token_id(text) if text else None
        if tid is not None:
            eos.append(tid)
            break
    return replace(tokenizer, eos_ids=tuple(dict.fromkeys(eos)),
                   bos_token=_token_text(tok_cfg.get("bos_token")), eos_token=eos_token,
                   add_special_tokens=True)
