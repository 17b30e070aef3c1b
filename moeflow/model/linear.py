"""The model's dense projections as they run: the plain nn.Linear, FP8 where the model's
`Backends.matmul` asks for it, or a weight-streaming kernel for a decode step's few rows
(moeflow.ops.backend.resolve_linear_backend chooses).

    q, k, v = project(self.qkv, x_BTD, self.backends.matmul).split(...)

FP8 runs the layers that hold most of a step's FLOPs: attention's qkv and output projections
(and MLA's), the dense MLPs (the shared experts and PR-MoE's residual MLP too) and, through
moeflow.model.experts, the expert GEMMs. The LM head, the router gates (and the other small
gates), the embeddings and the norms stay in high precision, as torchao's float8 training and
DeepSeek-V3 keep them: the head's logits feed the loss directly and a gate's logits decide which
experts a token reaches, so their rounding costs more than it saves; embeddings are lookups and
norms elementwise, with no GEMM to speed up; together they are a small share of the FLOPs.

FP8 is how the matmul is computed: the parameters, their dtype and the state_dict are the same
with either choice, so checkpoints do not depend on it. Calls that autograd does not record
(validation, generation, serving) run the plain linear, or, on CUDA for up to 16 rows (a
decode step), the kernels of moeflow.ops.skinny_linear_triton, which stream the weight once:
the one-row GEMV and, for 2-16 rows, the MMA kernel, whose swapped tiles also serve the wide
qkv projections. On the H200 both beat cuBLAS on the Qwen3-30B-A3B projections (that module
gives the numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.ops.backend import resolve_linear_backend
from moeflow.ops.fp8_linear import fp8_linear


def project(layer: nn.Linear, x: torch.Tensor, matmul: str, bias: bool = True,
            warm_l2: bool = False) -> torch.Tensor:
    """layer(x) as `matmul` (a Backends.matmul name) chooses; `bias=False` leaves the layer's
    bias out (a row-parallel partial sum adds it after the reduction). `warm_l2`: the
    weight-streaming kernel prefetches its weight to L2 while the latency-bound kernel ahead
    still runs (moeflow.ops.skinny_linear_triton.linear_stream)."""
    kind = resolve_linear_backend(matmul, x, layer.weight)
    if kind == "reference":
        return layer(x) if bias else F.linear(x, layer.weight)
    if kind == "stream":
        from moeflow.ops.skinny_linear_triton import linear_stream
        return linear_stream(x, layer.weight, layer.bias if bias else None, warm_l2=warm_l2)
    y = fp8_linear(x, layer.weight, kernel=kind == "fp8")
    if bias and layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y
