"""Host cost of moeflow's own code per MoE layer call, measured on a CPU: every Triton launch is
made a no-op, so what is timed is the Python, the argument checks, the allocations and the
torch ops around the kernels (what a GPU host pays per eager call on top of the launches
themselves), for the Qwen3-30B-A3B and ds-1.3b+moe128 layers of benchmarks/moe_layer.py at
T = 8 (the one-launch decode router) and Qwen3 at T = 40 (320 assignments: the fused
multi-kernel router). The experts' hidden size is shrunk to 64 (no kernel runs, and nothing on
the host depends on it); at T = 40 the router's logits GEMM, a torch op, still runs on the
CPU, so that figure includes it. `--train` times training fwd+bwd calls instead (D 16, 8
experts: Qwen3 at T 8 and 128, ds-1.3b at T 8, all through the one-launch router under
autograd since session 35); the no-op launches zero their integer outputs there, so the torch
ops after them index valid rows and the grouped GEMMs get empty groups.
`--count` instead counts the Python function calls per call (cProfile; deterministic, unlike
the times on a shared host) for the inference and training cases (training at D 256), and
beside them the kernels each call would launch on CUDA (the Triton launches and the aten ops
that launch a kernel) and the ops among them that synchronise with the host, for moeflow and
for the minimal layer (issue 14, item 3: "count launches; remove syncs").

    PYTHONPATH=. python benchmarks/host_path_cpu.py [--calls 2000] [--repeats 5] [--count | --train]

prints µs per call (median of the repeats, each the mean of --calls calls; --train: a tenth
as many calls) per case, or with --count the Python calls, kernels and synchronising ops per
call.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: no GPU needed

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from triton.runtime import jit  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/moe_layer.py

SHAPES = {  # name: (D, E, activation, router), as benchmarks/moe_layer.py
    "qwen3-30b-a3b": (2048, 128, "swiglu",
                      RouterConfig(top_k=8, normalize_topk=True, dropless=True)),
    "ds-1.3b+moe128": (2048, 128, "gelu",
                       RouterConfig(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0)),
}
CASES = (("qwen3-30b-a3b", 8), ("ds-1.3b+moe128", 8), ("qwen3-30b-a3b", 40))
# What "auto" picks on CUDA for these calls, named so that the CPU takes the same paths.
BACKENDS = Backends(router="triton_decode_fused", dispatch="triton", experts="stream",
                    elementwise="triton")


def _layer(name: str, T: int, D: int | None = None, backends: Backends = BACKENDS,
           E: int | None = None):
    D0, E0, act, router = SHAPES[name]
    D, E = D or D0, E or E0
    spec = FFNSpec(kind="moe", d_ff=64, num_experts=E, expert_d_ff=64, router=router)
    return MoELayer(spec, D, act, bias=False, backends=backends), torch.randn(1, T, D)


def python_calls(fn, calls: int = 20) -> float:
    """Python function calls per call of fn, after warm-up calls, with the Triton launches as
    no-ops that leave valid indices (_valid_launch); those of this script (fn itself, the
    no-op launches and what they call) left out."""
    launch = jit.KernelInterface.__getitem__
    jit.KernelInterface.__getitem__ = _valid_launch
    try:
        for _ in range(3):
            fn()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            fn()
        profile.disable()
    finally:
        jit.KernelInterface.__getitem__ = launch
    stats = pstats.Stats(profile)
    own = sum(row[1] for key, row in stats.stats.items() if key[0] == __file__)
    by_stub = sum(counts[1] for key, row in stats.stats.items() if key[0] != __file__
                  for caller, counts in row[4].items()
                  if caller[0] == __file__ and caller[2] in ("stub", "_valid_launch"))
    return (stats.total_calls - own - by_stub) / calls


# aten ops that launch no kernel on CUDA: views, metadata, allocations without a fill.
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "select", "slice", "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "unbind",
    "as_strided", "alias", "detach", "lift_fresh", "resolve_conj", "resolve_neg",
    "is_same_size", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# aten ops that wait for the GPU on CUDA: each reads a value back to size its output (bincount
# its largest id, nonzero its count; _local_scalar_dense is .item()).
SYNCS = frozenset({"_local_scalar_dense", "bincount", "nonzero", "unique", "_unique2",
                   "masked_select"})
TRITON_LAUNCHES: list[str] = []  # what the no-op launches were asked to run (_valid_launch)


class KernelCounter(TorchDispatchMode):
    """The kernels one call would launch on CUDA (aten ops that launch one, and the Triton
    launches the stub recorded) and the syncs among them."""

    def __enter__(self):
        self.kernels: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._triton_before = len(TRITON_LAUNCHES)
        return super().__enter__()

    def __exit__(self, *exc):
        self.kernels.update(f"triton:{n}" for n in TRITON_LAUNCHES[self._triton_before:])
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.kernels[name] += 1
        if name in SYNCS:
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


def _no_launch(kernel, grid):
    """A Triton launch that runs nothing (every launch, as main installs it)."""
    return lambda *args, **kwargs: None


def _valid_launch(kernel, grid, in_counter: bool = False):
    """A Triton launch that runs nothing but records the kernel's name and zero-fills its
    integer tensors (ids, rows, token lists, counts; through .data, which autograd's version
    checks do not see), so that the torch ops after it index valid rows: the training path
    gathers the rows the router planned. `in_counter`: a KernelCounter is active and must not
    count the fills."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "?")

    def stub(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor) and not a.is_floating_point():
                if in_counter:
                    with _disable_current_modes():
                        a.data.zero_()
                else:
                    a.data.zero_()
        TRITON_LAUNCHES.append(name)
    return stub


def _counted_launch(kernel, grid):
    """_valid_launch inside a KernelCounter."""
    return _valid_launch(kernel, grid, in_counter=True)


def launches(fn) -> KernelCounter:
    """The kernels and synchronising ops of one call of fn (after two warm-up calls), its
    Triton launches recorded and not run (_valid_launch)."""
    launch = jit.KernelInterface.__getitem__
    jit.KernelInterface.__getitem__ = _counted_launch
    try:
        for _ in range(2):
            fn()
        with KernelCounter() as counter:
            fn()
    finally:
        jit.KernelInterface.__getitem__ = launch
    return counter


def _minimal(name: str, T: int, D: int, E: int | None = None):
    """The issue's minimal grouped_mm layer (benchmarks/moe_layer.py) at this case's shape."""
    from moe_layer import MinimalMoE

    _, E0, act, router = SHAPES[name]
    E = E or E0
    layer = MinimalMoE(D, 64, E, router.top_k, act, router.normalize_topk)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, D ** -0.5)
    return layer


def _describe(label: str, counter: KernelCounter, calls: float | None = None) -> str:
    triton = sum(v for k, v in counter.kernels.items() if k.startswith("triton:"))
    py = "" if calls is None else f"{calls:.0f} Python calls, "
    return (f"{label}: {py}{sum(counter.kernels.values())} kernels ({triton} Triton), "
            f"{sum(counter.syncs.values())} synchronising ops")


def count() -> None:
    """Per call: moeflow's Python calls, and the kernels (with the Triton launches among them)
    and host syncs it would issue on CUDA, beside the minimal layer's at the same shape; the
    inference cases as CASES (bf16, no autograd), then training fwd+bwd of the Qwen3 layer at
    T 8 and 128 and the ds-1.3b one at T 8 (D 256; the backward of moe_layer.py's cells:
    y.backward(g)), on the paths "auto" takes there on CUDA."""
    for name, T in CASES:
        layer, x = _layer(name, T)
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
        with torch.no_grad():
            calls = python_calls(lambda: layer(x))
            minimal = _minimal(name, T, x.shape[-1]).to(torch.bfloat16)
            their_calls = python_calls(lambda: minimal(x[0]))
            ours, theirs = launches(lambda: layer(x)), launches(lambda: minimal(x[0]))
        print(f"{name} T={T}: " + _describe("moeflow", ours, calls) + "; "
              + _describe("minimal", theirs, their_calls))
    for name, T in TRAIN_CASES:
        ours_run, theirs_run = _train_calls(name, T)
        calls, their_calls = python_calls(ours_run), python_calls(theirs_run)
        ours, theirs = launches(ours_run), launches(theirs_run)
        print(f"{name} T={T} fwd+bwd (D 256): " + _describe("moeflow", ours, calls) + "; "
              + _describe("minimal", theirs, their_calls))


# Training fwd+bwd cases (D 256), on the paths "auto" takes there on CUDA.
TRAIN_CASES = (("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 128), ("ds-1.3b+moe128", 8))
TRAIN = Backends(router="triton_decode", dispatch="triton", experts="grouped_mm_fused",
                 elementwise="triton")


def _train_calls(name: str, T: int, D: int = 256, E: int | None = None):
    """(moeflow's, the minimal layer's) fwd+bwd call at this case's shape, model dim D (and E
    experts if given): the backward of moe_layer.py's cells, y.backward(g)."""
    layer, x = _layer(name, T, D=D, backends=TRAIN, E=E)
    layer, x = layer.to(torch.bfloat16), x[0].to(torch.bfloat16).requires_grad_(True)
    minimal = _minimal(name, T, D, E).to(torch.bfloat16)
    g = torch.randn_like(x)

    def fwd_bwd(module, moeflow: bool):
        params = list(module.parameters())

        def run():
            for p in params:
                p.grad = None
            x.grad = None
            (module(x)[0] if moeflow else module(x)).backward(g)
        return run
    return fwd_bwd(layer, True), fwd_bwd(minimal, False)


def train_us(name: str, T: int, calls: int, repeats: int) -> float:
    """µs per moeflow fwd+bwd call. The Triton launches zero-fill their integer outputs
    (_valid_launch), so the experts' grouped GEMMs get empty groups (all offsets 0); the model
    dim is 16 and the experts 8 (the CPU's torch._grouped_mm loops over the groups, ~10 torch
    ops each, and writes every expert's weight gradient: at 128 experts that took most of the
    time). What is timed is mostly host work, the backward's autograd engine included. The
    minimal layer is not timed: its ops compute on the CPU, where a GPU host only issues
    them."""
    run = _train_calls(name, T, D=16, E=8)[0]
    launch = jit.KernelInterface.__getitem__
    jit.KernelInterface.__getitem__ = _valid_launch
    times = []
    try:
        for _ in range(20):
            run()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times.append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        jit.KernelInterface.__getitem__ = launch
    return statistics.median(times)


def per_call_us(name: str, T: int, calls: int, repeats: int) -> float:
    layer, x = _layer(name, T)
    layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    times = []
    with torch.no_grad():
        for _ in range(20):
            layer(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                layer(x)
            times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--count", action="store_true",
                    help="Python calls, kernels and syncs per call instead")
    ap.add_argument("--train", action="store_true",
                    help="time the training fwd+bwd cases instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    jit.KernelInterface.__getitem__ = _no_launch
    if args.count:
        count()
        return
    if args.train:
        for name, T in TRAIN_CASES:
            us = train_us(name, T, max(1, args.calls // 10), args.repeats)
            print(f"{name} T={T} fwd+bwd (D 16, 8 experts): {us:.1f} us per call", flush=True)
        return
    for name, T in CASES:
        calls = args.calls if T <= 8 else max(1, args.calls // 4)
        us = per_call_us(name, T, calls, args.repeats)
        print(f"{name} T={T}: {us:.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
