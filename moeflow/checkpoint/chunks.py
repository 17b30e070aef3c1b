"""Where this rank's tensors sit in a checkpoint's global, layout-free tensors.

A checkpoint stores every tensor as one process holds it, whatever layout wrote it: dense tensors
as they are, an MoE layer's expert tensors stacked over all E experts with row g = global expert
g. Each rank contributes its `Chunk` of each: the whole tensor for a dense one (every rank holds
it; torch.distributed.checkpoint writes one copy), its experts' rows for an expert one and, with
expert slicing, its part of the hidden width F. A SwiGLU first projection holds [gate | up], so a
slice j holds [gate_j | up_j], two blocks of the [E, D, 2F] tensor; it is therefore stored with
the halves on their own axis (w_in_EDI as [E, D, 2, F], b_in_EI as [E, 2, F]), where a slice is
one block. `Chunk.local` is a view of the live tensor in that stored shape, so loading writes
into the model (or the optimizer state) in place.

Optimizer state follows its parameter (`optimizer_chunks`): a state tensor shaped like the
parameter (AdamW's moments) is stored as that parameter's global tensor under
`optim.<parameter>.<state>` and chunked like it, so the moments reload at any EP/DP layout; a
scalar (AdamW's step) is stored whole. Tied tensors are stored once, under their first name.

Under tensor slicing (moeflow.parallel.tensor) a sliced module (one built with a `tp`) holds,
of each tensor it declares in `tp_splits`, one part of every section along an axis (a fused QKV
weight: part of the query, of the key and of the value rows): such a tensor's chunk is a tuple
of chunks, one per section, and reading fills each in place.

Legend: E experts, El experts held here, D model dim, F expert hidden width, s slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.model.experts import Experts

OPTIM = "optim."


@dataclass(frozen=True)
class Chunk:
    local: torch.Tensor  # this rank's part, a view of the live tensor in the stored shape
    offsets: tuple[int, ...]  # where it starts in the global tensor
    shape: tuple[int, ...]  # the global tensor's stored shape


# A tensor's chunk: one block, or (a tensor-sliced tensor) one block per section.
Chunks = Chunk | tuple[Chunk, ...]


def whole(t: torch.Tensor) -> Chunk:
    return Chunk(t, (0,) * t.dim(), tuple(t.shape))


def pieces(c: Chunks) -> tuple[Chunk, ...]:
    return c if isinstance(c, tuple) else (c,)


def tensor_names(model: nn.Module) -> dict[int, str]:
    """{id(tensor): stored name} of the model's parameters and buffers (tied ones: the first)."""
    names: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), name)
    return names


def sliced_tensors(model: nn.Module) -> dict[str, tuple[object, int, tuple[int, ...]]]:
    """{stored name: (tp, axis, global sections)} of the tensors held tensor-sliced."""
    from moeflow.model.attention import Attention
    from moeflow.model.mla import MLAttention
    from moeflow.model.mlp import MLP

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Attention, MLAttention, MLP)) and m.tp is not None:
            for leaf, (axis, sections) in m.tp_splits.items():
                out[f"{name}.{leaf}"] = (m.tp, axis, sections)
    return out


def model_chunks(model: nn.Module) -> dict[str, Chunks]:
    """{stored name: this rank's chunk} of every model tensor (tied tensors once)."""
    from moeflow.parallel.tensor import split_chunks

    experts = {f"{name}.": m for name, m in model.named_modules() if isinstance(m, Experts)}
    sliced = sliced_tensors(model)
    out = {}
    state = model.state_dict(keep_vars=True)
    for name in tensor_names(model).values():
        t = state[name].detach()
        prefix, _, leaf = name.rpartition(".")
        ex = experts.get(prefix + ".")
        if name in sliced:
            tp, axis, sections = sliced[name]
            out[name] = split_chunks(t, axis, sections, tp.rank, tp.size)
        else:
            out[name] = whole(t) if ex is None else expert_chunk(ex, leaf, t)
    return out


def global_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{stored name: global shape} of every tensor of the whole model, including those no part
    of this rank holds (a later expert slice has no output bias: slice 0 holds it)."""
    out = {k: pieces(c)[0].shape for k, c in model_chunks(model).items()}
    for name, m in model.named_modules():
        if isinstance(m, Experts) and m.b_in_EI is not None and m.b_out_ED is None:
            out[f"{name}.b_out_ED"] = (m.num_experts, m.d_model)
    return out


def expert_chunk(ex: Experts, leaf: str, t: torch.Tensor) -> Chunk:
    """The chunk of expert tensor `leaf` held by `ex` (all of it without a layout)."""
    E, D, F = ex.num_experts, ex.d_model, ex.d_ff
    lay = ex.layout
    s, j = (1, 0) if lay is None else (lay.slices, lay.slice_index)
    ids = ex.expert_ids
    first, El, Fs = ids[0], len(ids), F // s
    if ids != tuple(range(first, first + El)):
        raise ValueError(f"experts {ids}: a rank's experts must be consecutive global ids")
    gated = ex.activation == "swiglu"
    if leaf == "w_in_EDI":
        local, full, at = ((D, 2, Fs), (D, 2, F), (0, 0, j * Fs)) if gated else \
            ((D, Fs), (D, F), (0, j * Fs))
    elif leaf == "b_in_EI":
        local, full, at = ((2, Fs), (2, F), (0, j * Fs)) if gated else ((Fs,), (F,), (j * Fs,))
    elif leaf == "w_out_EFD":
        local, full, at = (Fs, D), (F, D), (j * Fs, 0)
    elif leaf == "b_out_ED":  # held whole by slice 0 only (the slices' outputs are summed)
        local, full, at = (D,), (D,), (0,)
    else:
        raise ValueError(f"expert tensor {leaf!r}: no stored layout is defined for it")
    return Chunk(t.view(El, *local), (first, *at), (E, *full))


def optimizer_chunks(model: nn.Module, optimizers: list[torch.optim.Optimizer]
                     ) -> dict[str, Chunk]:
    """{'optim.<parameter>.<state>': chunk} of the state these (local) optimizers hold."""
    chunks, names = model_chunks(model), tensor_names(model)
    out = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                if isinstance(chunks[name], tuple):
                    raise ValueError(f"{name} is tensor-sliced: optimizer state is only "
                                     f"checkpointed for expert/data-parallel layouts")
                for key, value in opt.state.get(p, {}).items():
                    out[f"{OPTIM}{name}.{key}"] = state_chunk(chunks[name], p, name, key, value)
    return out


def state_chunk(param: Chunk, p: torch.Tensor, name: str, key: str, value) -> Chunk:
    if torch.is_tensor(value) and value.shape == p.shape:
        return Chunk(value.detach().view(param.local.shape), param.offsets, param.shape)
    if torch.is_tensor(value) and value.dim() == 0:
        return whole(value.detach())
    raise ValueError(f"optimizer state {key!r} of {name}: only tensors shaped like the "
                     f"parameter or scalars can be checkpointed")


def empty_optimizer_chunks(model: nn.Module, optimizers: list[torch.optim.Optimizer],
                           stored: dict[str, tuple[tuple[int, ...], torch.dtype]]
                           ) -> tuple[dict[str, Chunk], list[dict]]:
    """Chunks to read the stored optimizer state into, and for each optimizer its state_dict
    with those (still empty) tensors in place, ready for `load_state_dict` once read. A
    parameter without stored state keeps none (fresh moments, as AdamW starts)."""
    chunks, names = model_chunks(model), tensor_names(model)
    by_param: dict[str, dict[str, tuple]] = {}
    for key, meta in stored.items():
        if key.startswith(OPTIM):
            name, _, stat = key[len(OPTIM):].rpartition(".")
            by_param.setdefault(name, {})[stat] = meta
    wanted, states = {}, []
    for opt in optimizers:
        sd = opt.state_dict()
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for index, p in enumerate(params):
            name = names[id(p)]
            held = chunks[name]
            for stat, (shape, dtype) in by_param.get(name, {}).items():
                if shape == held.shape:
                    local = torch.zeros(held.local.shape, dtype=dtype, device=p.device)
                    wanted[f"{OPTIM}{name}.{stat}"] = Chunk(local, held.offsets, held.shape)
                    state.setdefault(index, {})[stat] = local.view(p.shape)
                elif shape == ():
                    local = torch.zeros((), dtype=dtype)
                    wanted[f"{OPTIM}{name}.{stat}"] = whole(local)
                    state.setdefault(index, {})[stat] = local
                else:
                    raise ValueError(f"optimizer state {stat!r} of {name} has shape "
                                     f"{list(shape)} in the checkpoint but the parameter is "
                                     f"{list(held.shape)}")
        states.append({**sd, "state": state})
    return wanted, states
