"""The model's side of tensor slicing (moeflow.parallel.tensor describes the scheme).

A module built with a `tp` (a moeflow.parallel.tensor.TensorSlice; None = whole) holds 1/tp.size
of its sliced widths; `part` computes that width, and `row_parallel` applies a row-parallel
projection: the local matmul gives a partial sum, one all-reduce completes it, and the bias
(held whole by every rank) is added once, after the reduction. The matmul runs as `matmul` (a
Backends.matmul name) chooses, see moeflow.model.linear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeflow.model.linear import project

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.parallel.tensor import TensorSlice


def part(n: int, tp: TensorSlice | None, what: str) -> int:
    """This rank's share of a width `n` that tensor slicing splits evenly."""
    if tp is None:
        return n
    if n % tp.size:
        raise ValueError(f"{what}={n}: must be divisible by the tensor-parallel size {tp.size}")
    return n // tp.size


def row_parallel(linear: nn.Linear, x: torch.Tensor, tp: TensorSlice | None,
                 matmul: str = "auto", warm_l2: bool = False) -> torch.Tensor:
    if tp is None:
        return project(linear, x, matmul, warm_l2=warm_l2)
    y = tp.all_reduce(project(linear, x, matmul, bias=False, warm_l2=warm_l2))
    return y if linear.bias is None else y + linear.bias
