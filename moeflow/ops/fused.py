"""Inference on CUDA: chains of small ops fused into one kernel each with torch.compile.

Why: a decode step runs every layer's norms, rotary embedding and attention softmax on a
handful of rows. In plain torch each chain is 4-10 kernels of a few microseconds,
and at batch 1 these launches (about 70 per layer), not the weight reads, set the step time even
inside a CUDA graph. torch.compile (inductor) turns each chain into one generated kernel.

The fused twin is the plain-torch function itself, compiled, so there is one definition of the
math; fused fp32 arithmetic may round differently in the last bits. Callers pass their model's
choice, `fn(..., fuse=backends.fuse)`, and `moeflow.ops.backend.resolve_fuse` decides per call
("auto": CUDA, autograd off, small input; "reference" and "compiled" force a path). Compilation
happens at the first call that wants the twin (the engine's warm-up, before any graph capture);
a second shape makes the twin shape-dynamic, so batch buckets and prompt lengths do not
recompile each time.

When the twin fails (no C compiler, an unsupported op, dynamo's recompile limit), the call runs
the reference instead, and so do later calls with the same signature (devices, dtypes and ranks
of the tensors, the other arguments' values: what tells one call site's graph from another's),
while other signatures keep the twin. The first fallback of each function is logged as a
warning naming it; later ones at debug level. If the reference fails too, the error was the
caller's: it is raised and nothing falls back.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

import torch

from moeflow.ops.backend import resolve_fuse

Fn = TypeVar("Fn", bound=Callable)
log = logging.getLogger(__name__)


def _signature(args: tuple, kwargs: dict) -> tuple:
    def one(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.device.type, a.dtype, a.dim())
        return a if a is None or isinstance(a, (bool, int, float, str)) else type(a).__name__

    return tuple(map(one, args)) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def fused(fn: Fn) -> Fn:
    """`fn` with a lazily compiled twin; call it with `fuse=` one of "auto", "reference",
    "compiled" (default "auto")."""
    compiled: list[Callable] = []  # the twin, made at the first call that wants it
    fell_back: set[tuple] = set()  # signatures whose twin failed

    @functools.wraps(fn)
    def run(*args, fuse: str = "auto", **kwargs):
        if not resolve_fuse(fuse, args[0]):
            return fn(*args, **kwargs)
        if fell_back and _signature(args, kwargs) in fell_back:
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, fullgraph=True))
        # Autograd is off here, so arguments go in detached: dynamo keeps a Parameter's sizes
        # static and would recompile for every layer shape (router gates of 8 and 16 experts
        # hit the recompile limit), while plain tensors become dynamic.
        detached = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
        try:
            return compiled[0](*detached, **kwargs)
        except Exception as err:  # noqa: BLE001 - the reference below tells whose error it is
            out = fn(*args, **kwargs)  # raises if the inputs, not the compiler, are at fault
            fell_back.add(_signature(args, kwargs))
            first = str(err).splitlines()[0] if str(err) else ""
            level = logging.WARNING if len(fell_back) == 1 else logging.DEBUG
            log.log(level, "moeflow: the compiled %s failed (%s: %s); plain torch runs it for "
                    "calls like this one from now on", fn.__name__, type(err).__name__, first)
            return out

    run.reference = fn
    return run
