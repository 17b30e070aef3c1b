"""A layer's experts as stacked weights, one tensor per projection with a leading expert axis.

Legend: E experts (held here), D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU gate|up).
`w_in_EDI` holds [gate | up] for SwiGLU. The computation is delegated to moeflow.ops through the
backend chooser, by `backends.experts` ("auto" unless the model's Backends forces one), or in
FP8 where `backends.matmul` asks for it and autograd records the call (moeflow.ops.fp8_grouped).

Under expert parallelism the module holds a part of the layer: `layout` (a
moeflow.parallel.mesh.LayerLayout, given at construction; None = the whole layer) names the
global experts held here (`expert_ids`, in local order) and, with expert slicing, which of
`slices` equal parts of the hidden width F; the partial outputs of the slices are summed on
combine, so only slice 0 holds the output bias. `num_experts` and `d_ff` stay the layer's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeflow.ops.activation import ffn_in_width
from moeflow.ops.autocast import autocast_dtype
from moeflow.ops.backend import (EXPERT_BACKENDS, Backends, ChoosesBackends, records_grad,
                                  resolve_expert_backend)
from moeflow.ops.device_counters import DeviceCounters

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.model.dispatch import RowPlacement
    from moeflow.parallel.mesh import LayerLayout


class Experts(nn.Module, ChoosesBackends):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, bias: bool,
                 backends: Backends = Backends(), layout: LayerLayout | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.backends = backends
        self.layout = layout
        # The one-launch stream kernel's counts, made on its first launch on a device.
        self._stream_counters = DeviceCounters()
        held_E, held_F, out_bias = num_experts, d_ff, bias
        if layout is not None:
            if layout.num_experts != num_experts:
                raise ValueError(f"layout: layer {layout.layer} has {layout.num_experts} experts "
                                 f"in the layout but num_experts={num_experts}")
            if d_ff % layout.slices:
                raise ValueError(f"d_ff={d_ff}: must be divisible by the layout's "
                                 f"{layout.slices} expert slices")
            held_E, held_F = len(layout.expert_ids), d_ff // layout.slices
            out_bias = bias and layout.slice_index == 0
        d_in = ffn_in_width(activation, held_F)
        self.w_in_EDI = nn.Parameter(torch.empty(held_E, d_model, d_in))
        self.w_out_EFD = nn.Parameter(torch.empty(held_E, held_F, d_model))
        self.b_in_EI = nn.Parameter(torch.zeros(held_E, d_in)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(held_E, d_model)) if out_bias else None

    @property
    def expert_ids(self) -> tuple[int, ...]:
        """Global ids of the experts held here, in local order."""
        return tuple(range(self.num_experts)) if self.layout is None else self.layout.expert_ids

    def places_rows(self, x_TD: torch.Tensor, num_rows: int) -> bool:
        """Whether a call over the tokens x_TD with `num_rows` expert rows runs the one-launch
        weight-streaming kernel, which can place the rows itself (forward's `placement`):
        inference without autocast's casts, the "stream" backend."""
        dtype = autocast_dtype(x_TD.device)
        if (self.layout is not None or records_grad(x_TD, self.w_in_EDI)
                or (dtype is not None and dtype != self.w_in_EDI.dtype)):
            return False
        fn = resolve_expert_backend(self.backends.experts, x_TD, self.w_in_EDI, self.w_out_EFD,
                                    num_rows, self.backends.matmul)
        return fn is EXPERT_BACKENDS["stream"]

    def forward(self, x_ND: torch.Tensor, ends_E: torch.Tensor, parked: bool = True,
                rows_N: torch.Tensor | None = None,
                placement: RowPlacement | None = None) -> torch.Tensor:
        """`parked`: rows past ends_E[-1] may exist (dropped assignments); False when dropless.
        `rows_N`: the expert-sorted rows are x_ND[rows_N] (x_ND holds the tokens; the
        weight-streaming kernel gathers them as it loads them, the others gather first).
        `placement` (where places_rows): the routing left the rows unplaced; the stream
        kernel finds each expert's tokens in its ids and writes rows_N and the placement's
        row_TK and slots_TK."""
        w_in, b_in, w_out, b_out = self.w_in_EDI, self.b_in_EI, self.w_out_EFD, self.b_out_ED
        dtype = autocast_dtype(x_ND.device)
        if dtype is not None and dtype != w_in.dtype:
            # Under autocast torch runs every expert matmul in `dtype` anyway; casting once here
            # is the same arithmetic and lets the grouped kernels (bf16-only on CUDA) run. Left
            # to autocast, the fp32 master weights and the fp32 norm output would select the
            # per-expert loop: 5x slower training steps at the reproduce scale on an H200.
            x_ND, w_in, w_out = x_ND.to(dtype), w_in.to(dtype), w_out.to(dtype)
            b_in, b_out = (None if b is None else b.to(dtype) for b in (b_in, b_out))
        num_rows = None if rows_N is None else rows_N.shape[0]
        fn = resolve_expert_backend(self.backends.experts, x_ND, w_in, w_out, num_rows,
                                    self.backends.matmul)
        if fn is EXPERT_BACKENDS["stream"]:
            # The up and down kernels in one launch (moeflow.ops.grouped_mlp_triton), with two
            # counts per expert (one launch at a time: one stream, as the router's tickets).
            from moeflow.ops.grouped_mlp_triton import COUNTERS_PER_EXPERT  # imports Triton
            counters = self._stream_counters.get(COUNTERS_PER_EXPERT * w_out.shape[0],
                                                 x_ND.device)
            place = (None if placement is None else
                     (placement.ids_TK, placement.slots_TK, placement.row_TK))
            return fn(x_ND, ends_E, w_in, b_in, w_out, b_out, self.activation, parked,
                      rows_N=rows_N, counters=counters, placement=place)
        if placement is not None:
            raise ValueError(f"Experts: the rows were left for the stream kernel to place, but "
                             f"this call runs {getattr(fn, '__name__', fn)}")
        return fn(x_ND, ends_E, w_in, b_in, w_out, b_out, self.activation, parked, rows_N=rows_N)
