"""Inference on CUDA: chains of small ops fused into one kernel each with torch.compile.

Why: a decode step runs every layer's norms, rotary embedding, router prologue and attention
softmax on a handful of rows. In plain torch each chain is 4-10 kernels of a few microseconds,
and at batch 1 these launches (about 70 per layer), not the weight reads, set the step time even
inside a CUDA graph. torch.compile (inductor) turns each chain into one generated kernel.

The fused twin is the plain-torch function itself, compiled, so there is one definition of the
math; fused fp32 arithmetic may round differently in the last bits. The choice is made here
only: `fused(fn)` runs the compiled twin when the first argument is a CUDA tensor and autograd is
off (inference; training keeps the reference and its autograd) and the input is small (see
FUSE_MAX_ELEMENTS), unless the environment sets
MOEFLOW_FUSE=0 (the override benchmarks and tests use to compare both). Compilation happens at the
first CUDA call (the engine's warm-up, before any graph capture); a second shape makes the
compiled twin shape-dynamic, so batch buckets and prompt lengths do not recompile each time. If
compilation fails (no C compiler, an unsupported op), the reference is used from then on, with
one warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)


# Fusing pays where launches dominate (decode: a few rows). On large inputs the shape-dynamic
# compiled twins measured slower than plain torch: prefill of 2048 tokens of the Qwen3-30B-A3B
# shape took 102 ms fused vs 78 ms plain on an H100 (benchmarks/results/generate.md), so above
# this many elements in the first argument the reference runs.
FUSE_MAX_ELEMENTS = 1 << 20


def fuse_enabled(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.numel() <= FUSE_MAX_ELEMENTS and not torch.is_grad_enabled()
            and os.environ.get("MOEFLOW_FUSE", "1") != "0")


def fused(fn: Fn) -> Fn:
    """`fn` with a lazily compiled twin chosen by `fuse_enabled(first argument)`."""
    compiled: list[Callable] = []  # filled on the first CUDA call; [fn] if compiling failed

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not fuse_enabled(args[0]):
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, fullgraph=True))
        if compiled[0] is fn:
            return fn(*args, **kwargs)
        try:
            # Autograd is off here, so arguments go in detached: dynamo keeps a Parameter's
            # sizes static and would recompile for every layer shape (router gates of 8 and
            # 16 experts hit the recompile limit), while plain tensors become dynamic.
            args = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
            return compiled[0](*args, **kwargs)
        except Exception as err:  # compilation (or a recompilation) failed: keep the reference
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"moeflow: fusing {fn.__name__} failed ({type(err).__name__}: "
                          f"{first}); using plain torch")
            compiled[0] = fn
            return fn(*args, **kwargs)

    run.reference = fn
    return run
