"""Host cost of moeflow's own code per MoE layer call on the inference paths, measured on a CPU:
every Triton launch is made a no-op, so what is timed is the Python, the argument checks, the
allocations and the torch ops around the kernels (what a GPU host pays per eager call on top
of the launches themselves), for the Qwen3-30B-A3B and ds-1.3b+moe128 layers of
benchmarks/moe_layer.py at T = 8 (the one-launch decode router) and Qwen3 at T = 40 (320
assignments: the fused multi-kernel router). The experts' hidden size is shrunk to 64 (no
kernel runs, and nothing on the host depends on it); at T = 40 the router's logits GEMM, a
torch op, still runs on the CPU, so that figure includes it. `--count` instead counts the
Python function calls per layer call (cProfile; deterministic, unlike the times on a shared
host), for those cases and for a training fwd+bwd of the Qwen3 layer (D 256, T 8: the fused
router with its backward, the Triton dispatch; the experts' torch._grouped_mm runs on the CPU).

    PYTHONPATH=. python benchmarks/host_path_cpu.py [--calls 2000] [--repeats 5] [--count]

prints µs per call (median of the repeats, each the mean of --calls calls) per case, or with
--count the Python calls per call.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: no GPU needed

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from triton.runtime import jit  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402

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


def _layer(name: str, T: int, D: int | None = None, backends: Backends = BACKENDS):
    D0, E, act, router = SHAPES[name]
    D = D or D0
    spec = FFNSpec(kind="moe", d_ff=64, num_experts=E, expert_d_ff=64, router=router)
    return MoELayer(spec, D, act, bias=False, backends=backends), torch.randn(1, T, D)


def python_calls(fn, calls: int = 20) -> float:
    """Python function calls per call of fn, after warm-up calls."""
    for _ in range(3):
        fn()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    return pstats.Stats(profile).total_calls / calls


def count() -> None:
    for name, T in CASES:
        layer, x = _layer(name, T)
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
        with torch.no_grad():
            print(f"{name} T={T}: {python_calls(lambda: layer(x)):.0f} Python calls per call")
    layer, x = _layer("qwen3-30b-a3b", 8, D=256, backends=Backends(
        router="triton", dispatch="triton", elementwise="triton"))
    x.requires_grad_(True)

    def fwd_bwd():
        y, routing = layer(x)
        (y.float().sum() + routing.loss).backward()
    print(f"qwen3-30b-a3b T=8 fwd+bwd (D 256): {python_calls(fwd_bwd):.0f} Python calls per call")


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
    ap.add_argument("--count", action="store_true", help="Python calls per call instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    jit.KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **k: None)  # no launches
    if args.count:
        count()
        return
    for name, T in CASES:
        calls = args.calls if T <= 8 else max(1, args.calls // 4)
        us = per_call_us(name, T, calls, args.repeats)
        print(f"{name} T={T}: {us:.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
