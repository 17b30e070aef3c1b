"""Model checkpoints that reload at any expert-parallel layout (or in one process).

Layout on disk (a directory, on a filesystem every rank can reach):
  meta.json                 format, model config, per MoE layer: expert count and full shapes
  dense.safetensors         every non-expert tensor, written once by rank 0 (tied weights once)
  experts-rankNNNNN.safetensors
                            one file per writing rank; each expert tensor stored once, under
                            its GLOBAL id, without the expert axis:
                              blocks.3.ffn.experts.w_in_EDI.expert_017           [D, I]
                            sliced experts (expert slicing) store one key per slice:
                              blocks.3.ffn.experts.w_in_EDI.expert_000.slice_1of2 [D, I/s]
Only the first replica of each layer writes experts, so nothing is stored twice. A loader reads the
global ids its layout needs (all of them in one process), joins slices and re-slices as its own
layout requires: what was saved at EP=2 loads at EP=1 or EP=4 (DeepSpeed #6589 loaded the wrong
experts after such a change because files were keyed by local index).

Loading checks the metadata first: a layer whose expert count, model width or expert width
differs from the model's is refused with a ValueError naming the layer, the axis and both values.
Optimizer state is not part of these checkpoints.

Legend: E experts, D model dim, F expert ffn dim, I = F or 2F (SwiGLU gate|up), s slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeflow.model.moe import MoELayer
from moeflow.parallel.shard import EXPERT_TENSORS, join_slices, slice_part

FORMAT = "moeflow-experts-v1"
# Axis names of each per-expert tensor (the expert axis removed), for error messages.
AXES = {"w_in_EDI": ("d_model", "ffn_in"), "b_in_EI": ("ffn_in",),
        "w_out_EFD": ("d_ff", "d_model"), "b_out_ED": ("d_model",)}


def _moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _full_shapes(layer: MoELayer) -> dict[str, list[int]]:
    """Per-expert shapes of the unsliced layer, whatever this rank holds."""
    ex = layer.experts
    D, F = ex.d_model, ex.d_ff
    I = 2 * F if ex.activation == "swiglu" else F
    shapes = {"w_in_EDI": [D, I], "w_out_EFD": [F, D]}
    if ex.b_in_EI is not None:  # biases come in pairs (slices past the first drop b_out)
        shapes["b_in_EI"] = [I]
        shapes["b_out_ED"] = [D]
    return shapes


def _dense_state(model: nn.Module, moe: dict[int, MoELayer]) -> dict[str, torch.Tensor]:
    expert_prefixes = tuple(f"blocks.{i}.ffn.experts." for i in moe)
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(expert_prefixes) or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach().cpu().contiguous()
    return out


def _expert_key(layer: int, name: str, expert: int, slice_: tuple[int, int] | None) -> str:
    key = f"blocks.{layer}.ffn.experts.{name}.expert_{expert:03d}"
    return key if slice_ is None else f"{key}.slice_{slice_[0]}of{slice_[1]}"


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Collective when distributed: every rank calls it; returns when all files are written."""
    path = Path(path)
    rank, world = _distributed()
    moe = _moe_layers(model)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()

    tensors: dict[str, torch.Tensor] = {}
    for i, layer in moe.items():
        ex, lay = layer.experts, layer.experts.layout
        if lay is not None and lay.replica != 0:
            continue
        sliced = lay is not None and lay.slices > 1
        for name in EXPERT_TENSORS:
            t = getattr(ex, name)
            if t is None:
                continue
            for local, g in enumerate(ex.expert_ids):
                part = (lay.slice_index, lay.slices) if sliced and name != "b_out_ED" else None
                tensors[_expert_key(i, name, g, part)] = t[local].detach().cpu().contiguous()
    own = f"experts-rank{rank:05d}.safetensors"
    if tensors:
        save_file(tensors, str(path / own))
    written = [own] if tensors else []
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, written)
        written = [f for files in gathered for f in files]
    if rank == 0:
        save_file(_dense_state(model, moe), str(path / "dense.safetensors"))
        meta = {
            "format": FORMAT,
            "model_config": model.config.to_dict(),
            "expert_files": written,
            "layers": {str(i): {"num_experts": layer.spec.num_experts,
                                "activation": layer.experts.activation,
                                "shapes": _full_shapes(layer)} for i, layer in moe.items()},
        }
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / "meta.json")
    if world > 1:
        dist.barrier()


def check_metadata(model: nn.Module, meta: dict) -> None:
    """Refuse a checkpoint whose experts do not fit the model (ValueError naming layer/axis)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a moeflow expert checkpoint (format {meta.get('format')!r})")
    moe = _moe_layers(model)
    saved = {int(k): v for k, v in meta["layers"].items()}
    if sorted(saved) != sorted(moe):
        raise ValueError(f"MoE layers differ: checkpoint has blocks {sorted(saved)}, model has "
                         f"blocks {sorted(moe)}")
    for i, layer in moe.items():
        want_E, got_E = layer.spec.num_experts, saved[i]["num_experts"]
        if want_E != got_E:
            raise ValueError(f"layer {i} (blocks.{i}.ffn.experts): axis 'experts' has {got_E} "
                             f"in the checkpoint but {want_E} in the model")
        want = _full_shapes(layer)
        for name, shape in want.items():
            got = saved[i]["shapes"].get(name)
            if got is None:
                raise ValueError(f"layer {i}: checkpoint has no {name} (model has shape {shape})")
            for axis, (a, b) in enumerate(zip(got, shape, strict=True)):
                if a != b:
                    raise ValueError(f"layer {i} (blocks.{i}.ffn.experts.{name}): axis "
                                     f"'{AXES[name][axis]}' is {a} in the checkpoint but {b} "
                                     f"in the model")


class _Reader:
    """Key → tensor over several safetensors files, opened lazily."""

    def __init__(self, path: Path, files: list[str]) -> None:
        self.handles = [safe_open(str(path / f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.where[key].get_tensor(key)
        except KeyError:
            raise ValueError(f"checkpoint has no tensor {key}") from None

    def slices_of(self, prefix: str) -> list[str]:
        found = sorted(k for k in self.where if k.startswith(prefix + ".slice_"))
        return sorted(found, key=lambda k: int(k.rsplit("slice_", 1)[1].split("of")[0]))


def _read_expert(reader: _Reader, layer: int, name: str, expert: int, swiglu: bool
                 ) -> torch.Tensor:
    """The full (unsliced) tensor of one expert, joining slices saved by a sliced layout."""
    key = _expert_key(layer, name, expert, None)
    if key in reader.where:
        return reader.get(key)
    parts = [reader.get(k) for k in reader.slices_of(key)]
    if not parts:
        raise ValueError(f"checkpoint has no tensor {key}")
    return join_slices(name, parts, swiglu)


@torch.no_grad()
def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load into a full or sharded model (each rank reads only what it holds)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    check_metadata(model, meta)
    dense = _Reader(path, ["dense.safetensors"])
    moe = _moe_layers(model)
    expert_prefixes = tuple(f"blocks.{i}.ffn.experts." for i in moe)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(expert_prefixes) or id(t) in seen:
            continue
        seen.add(id(t))
        src = dense.get(name)
        if src.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(src.shape)} in the checkpoint but "
                             f"{tuple(t.shape)} in the model")
        t.copy_(src)
    experts = _Reader(path, meta["expert_files"])
    for i, layer in moe.items():
        ex = layer.experts
        swiglu = ex.activation == "swiglu"
        for name in EXPERT_TENSORS:
            param = getattr(ex, name)
            if param is None:
                continue
            full = torch.stack([_read_expert(experts, i, name, g, swiglu)
                                for g in ex.expert_ids])
            if ex.layout is not None:
                full = slice_part(name, full, ex.layout, swiglu)
            param.copy_(full)
