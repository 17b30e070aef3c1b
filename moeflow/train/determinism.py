"""Bit-exact CPU training: torch's deterministic algorithms, switched on for the run.

Why: on CPU the backward of advanced indexing (`b_EX[expert_N]` in moeflow.ops.expert_mlp,
`x_TD[token_N]` in moeflow.model.dispatch) is `index_put_(accumulate=True)`. Once the source has
torch's parallel grain (32768 elements) and more than one intra-op thread is available, torch
runs it as a parallel loop of atomic float adds, each thread over a contiguous block of rows.
Where two blocks add into the same destination row, the order of the adds is the order in which
the threads get there: for the experts' bias gradients, the expert whose rows straddle the
split; for the dispatch gather, a token routed to three or more experts (two addends into zero
sum the same either way). On an idle machine the threads start together and the order repeats;
when other processes hold the cores, one thread starts late and the sum rounds differently in
its last bit. Two identical runs then drift apart, and so does a resumed run from a straight
one (two `tiny` runs on a busy 2-core machine: step-4 loss 7.3597341 vs 7.3597345). Tracing
every aten op of two such runs side by side, this was the only op whose output differed for
equal inputs; GEMMs, reductions and the tokenizer repeated exactly.

`torch.use_deterministic_algorithms(True)` makes that op add serially, which on 2 cores is also
faster than the contended atomics (the `tiny` bias gradient at the demo's shapes: 0.44 ms vs
1.26 ms); the `tiny` training step is unchanged within noise (about 210-240 ms either way,
median of interleaved blocks on a shared 2-core machine). Its other CPU effect, NaN-filling the
memory `torch.empty` hands out, is kept: it makes a read of uninitialised memory loud, and
moeflow.ops.expert_mlp already masks the rows `torch._grouped_mm` leaves uninitialised.

Scope: the mode is process-wide, so the trainer turns it on for `Trainer.run()` only and puts
back whatever the caller had; nothing needs setting before torch starts. On CUDA it is left
alone: there every cuBLAS matmul would raise unless CUBLAS_WORKSPACE_CONFIG was set before CUDA
initialised, and the mode does not cover the Triton kernels or NCCL anyway (the README says
what is and is not bit-exact on GPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the duration of the block when `device` is the CPU."""
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
