"""One rank's shard of a model read straight from a HF MoE checkpoint directory.

Under tensor slicing × expert parallelism (moeflow.parallel.inference) each rank holds a chunk
of every stored tensor (moeflow.checkpoint.chunks: offsets and shape in the global, layout-free
tensor). Here each chunk is filled from the HF tensors its rule (moeflow.interop.hf_weights)
names, reading as little as the format allows:
  * expert tensors: only this rank's experts, and with expert slicing only its rows of each
    expert's gate/up and its columns of down (per-expert tensors, or transformers ≥ 5's fused
    `experts.gate_up_proj` / `down_proj`, cut to the rank's experts);
  * a tensor stored as it is (norms, embeddings, o_proj, router gate): only the rows of the
    chunk;
  * a fused tensor (q|k|v, a dense gate|up): its parts are read whole and cut (they are the
    small, dense share of an MoE model).
Names are checked both ways before any tensor is read (`choose_rules`).

Legend: E experts, El this rank's experts, D model dim, F expert hidden width, Fs its slice.
"""

from __future__ import annotations

import torch

from moeflow.checkpoint.chunks import Chunk, Chunks, pieces
from moeflow.config import ModelConfig
from moeflow.interop.hf_config import GPT_MODEL_TYPE
from moeflow.interop.hf_weights import Rule, SafetensorsDir, choose_rules

EXPERT_IN, EXPERT_OUT = ".w_in_EDI", ".w_out_EFD"


@torch.no_grad()
def read_hf_chunks(config: ModelConfig, model_type: str, weights: SafetensorsDir,
                   chunks: dict[str, Chunks], where: str) -> None:
    """Fill every chunk of `chunks` (moeflow.checkpoint.chunks.model_chunks) in place."""
    rules = {r.moeflow: r for r in choose_rules(config, model_type, weights.keys(), where)}
    for name, chunk in chunks.items():
        rule = rules.get(name)
        if rule is None:
            raise ValueError(f"{where}: nothing in this {model_type} checkpoint holds {name!r}")
        for piece in pieces(chunk):
            part = _region(rule, model_type, piece, weights)
            if tuple(part.shape) != tuple(piece.local.shape):
                raise ValueError(f"{where}: tensor {rule.hf[0]!r} gives {name!r} a part of shape "
                                 f"{tuple(part.shape)}; this rank needs "
                                 f"{tuple(piece.local.shape)} (does config.json match?)")
            piece.local.copy_(part)


def _bounds(piece: Chunk) -> list[slice]:
    return [slice(o, o + n) for o, n in zip(piece.offsets, piece.local.shape)]


def _region(rule: Rule, model_type: str, piece: Chunk, weights: SafetensorsDir) -> torch.Tensor:
    """This chunk's region of the global stored tensor `rule` builds."""
    rows, *rest = _bounds(piece)
    if model_type != GPT_MODEL_TYPE and rule.moeflow.endswith((EXPERT_IN, EXPERT_OUT)):
        return _experts(rule, piece, weights)
    if rule.same:  # the HF tensor is the stored one (up to a view): read only the rows
        part = weights.get_slice(rule.hf[0])[rows]
        return part.reshape(part.shape[0], *piece.shape[1:])[(slice(None), *rest)]
    full = rule.join([weights.get(n) for n in rule.hf])
    return full.reshape(piece.shape)[(rows, *rest)]


def _experts(rule: Rule, piece: Chunk, weights: SafetensorsDir) -> torch.Tensor:
    """Stored w_in_EDI [E, D, 2, F] (gate, up) or w_out_EFD [E, F, D], this chunk's experts
    and slice, from per-expert HF tensors ([F, D] gate/up, [D, F] down) or fused ones
    ([E, 2F, D] gate_up, [E, D, F] down)."""
    rows = _bounds(piece)[0]
    gate_up = rule.moeflow.endswith(EXPERT_IN)
    E, F = piece.shape[0], piece.shape[-1] if gate_up else piece.shape[1]
    a = piece.offsets[-1] if gate_up else piece.offsets[1]
    cols = slice(a, a + (piece.local.shape[-1] if gate_up else piece.local.shape[1]))
    if len(rule.hf) == 1:  # fused over the experts
        t = weights.get_slice(rule.hf[0])
        if gate_up:  # [El, 2F, D] rows of gate then up
            g, u = t[rows, cols], t[rows, F + cols.start:F + cols.stop]
            return torch.stack([g.transpose(1, 2), u.transpose(1, 2)], 2)
        return t[rows, :, cols].transpose(1, 2)
    experts = range(rows.start, rows.stop)
    if gate_up:  # hf = (gate_0, up_0, gate_1, up_1, ...)
        if len(rule.hf) != 2 * E:
            raise ValueError(f"{rule.moeflow}: {len(rule.hf)} HF tensors for {E} experts")
        return torch.stack([torch.stack([weights.get_slice(rule.hf[2 * e + k])[cols].t()
                                         for k in (0, 1)], 1) for e in experts])
    return torch.stack([weights.get_slice(rule.hf[e])[:, cols].t() for e in experts])
