"""The model's side of tensor slicing (moeflow.parallel.tensor describes the scheme).

A module built with a `tp` (a moeflow.parallel.tensor.TensorSlice; None = whole) holds 1/tp.size
of its sliced widths; `part` computes that width, and `row_parallel` applies a row-parallel
projection: the local matmul gives a partial sum, one all-reduce completes it, and the bias
(held whole by every rank) is added once, after the reduction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.parallel.tensor import TensorSlice


def part(n: int, tp: TensorSlice | None, what: str) -> int:
    """This rank's share of a width `n` that tensor slicing splits evenly."""
    if tp is None:
        return n
    if n % tp.size:
        raise ValueError(f"{what}={n}: must be divisible by the tensor-parallel size {tp.size}")
    return n // tp.size


def row_parallel(linear: nn.Linear, x: torch.Tensor, tp: TensorSlice | None) -> torch.Tensor:
    if tp is None:
        return linear(x)
    y = tp.all_reduce(F.linear(x, linear.weight))
    return y if linear.bias is None else y + linear.bias
