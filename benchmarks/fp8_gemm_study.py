"""FP8 GEMMs on one GPU: how far the kernels are from the recipe, and where an FP8 step's time
goes (moeflow.ops.fp8_linear, moeflow.ops.fp8_grouped; CUDA only).

1. accuracy: the tests' operands (tests/test_fp8.py: rows and columns orders of magnitude
   apart, a zero row), the three GEMMs of a linear and of a grouped expert GEMM, kernel and
   reference, each against the recipe in fp64: the excess over fp32-accumulation rounding, and
   the kernel's error per unit of the sum of |products| (what tests/test_fp8.py bounds with
   HOPPER_FP8_ACC), also on Gaussian operands at contractions 64-4096, with and without
   use_fast_accum;
2. timing (median of 20, CUDA events): a finegrained-1b-sized linear (8192 x 2048 -> 6144) and
   expert GEMM (49152 rows, 64 experts, 2048 -> 1408), bf16 against FP8, forward and backward,
   and the quantization alone (plain torch and the fused Triton kernels, which the FP8 runs
   use).

    PYTHONPATH=. python benchmarks/fp8_gemm_study.py > fp8_gemm_study.log     # one H200: ~10 s
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_fp8 import (BF16_U, FP32_U, grouped_case, linear_case, linear_gemms,  # noqa: E402
                      recipe, run_grouped, run_linear)

from benchmarks.machine import cuda_event_ms  # noqa: E402
from moeflow.ops.fp8_grouped import fp8_grouped_mm  # noqa: E402
from moeflow.ops.fp8_linear import fp8_linear, quantize_rows, scaled_matmul  # noqa: E402
from moeflow.ops.fp8_quantize_triton import quantize_rows_triton  # noqa: E402


def errors(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(excess over the recipe's fp32-accumulation and bf16-output rounding, largest
    |error| - bf16 rounding per unit of Σ|products|) of got = a·bᵀ."""
    got, a, b = got.detach().cpu().double(), a.detach().cpu(), b.detach().cpu()
    qa, qb = recipe(a, 1), recipe(b, 1)
    want = qa @ qb.t()
    abs_sum = qa.abs() @ qb.abs().t()
    err = (got - want).abs() - BF16_U * want.abs()
    excess = (err - a.shape[1] * FP32_U * abs_sum * (1 + BF16_U)).max().item()
    return excess, (err / abs_sum.clamp_min(1e-300)).max().item()


def accuracy() -> None:
    print("== accuracy: excess over the fp32 recipe; error per sum|products|")
    x, w, dy = linear_case(torch.bfloat16, device="cuda", M=256, K=512, N=384, seed=5)
    for kernel in (False, True):
        outs = run_linear(x, w, dy, kernel=kernel)
        for name, (g, a, b) in zip(("y", "dx", "dw"),
                                   linear_gemms(x.detach(), w.detach(), dy, *outs)):
            excess, per_abs = errors(g, a, b)
            print(f"linear kernel={kernel} {name}: excess {excess:.3g}, per sum|p| {per_abs:.3g}")
    x, w, dy, ends = grouped_case(torch.bfloat16, "cuda", counts=(37, 0, 130, 1, 64, 19),
                                  parked=5, K=256, J=384, seed=6)
    for kernel in (False, True):
        y, dx, dw = run_grouped(x, w, dy, ends, kernel=kernel)
        worst = {"y": 0.0, "dx": 0.0, "dw": 0.0}
        lo = 0
        for e, hi in enumerate(ends.tolist()):
            if hi > lo:
                rows = slice(lo, hi)
                for name, args in (("y", (y[rows], x[rows], w[e].t())),
                                   ("dx", (dx[rows], dy[rows], w[e])),
                                   ("dw", (dw[e].t(), dy[rows].t(), x[rows].t()))):
                    worst[name] = max(worst[name], errors(*args)[1])
            lo = hi
        print(f"grouped kernel={kernel}: per sum|p| {worst}")
    for K in (64, 512, 4096):
        g = torch.Generator(device="cuda").manual_seed(K)
        a = torch.randn(256, K, device="cuda", generator=g).bfloat16()
        b = torch.randn(384, K, device="cuda", generator=g).bfloat16()
        for fast in (False, True):
            qa, ia = quantize_rows(a)
            qb, ib = quantize_rows(b)
            got = torch._scaled_mm(qa, qb.t(), scale_a=ia, scale_b=ib.reshape(1, -1),
                                   out_dtype=torch.bfloat16, use_fast_accum=fast)
            print(f"gaussian K={K} use_fast_accum={fast}: per sum|p| {errors(got, a, b)[1]:.3g}")


def median_ms(fn) -> float:
    return cuda_event_ms(fn, reps=20, warmup=3)


def timing() -> None:
    print("== timing, ms (median of 20)")
    M, K, N = 8192, 2048, 3 * 2048
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    qx, ix = quantize_rows(x.detach())
    qw, iw = quantize_rows(w.detach())
    for name, fn in (
            ("bf16 linear fwd+bwd", lambda: F.linear(x, w).backward(dy)),
            ("fp8 linear fwd+bwd", lambda: fp8_linear(x, w, kernel=True).backward(dy)),
            ("fp8 linear fwd", lambda: fp8_linear(x.detach(), w.detach(), kernel=True)),
            ("quantize_rows x", lambda: quantize_rows(x.detach())),
            ("quantize_rows x.t()", lambda: quantize_rows(x.detach().t())),
            ("quantize_rows_triton x", lambda: quantize_rows_triton(x.detach())),
            ("quantize_rows_triton x.t()", lambda: quantize_rows_triton(x.detach().t())),
            ("_scaled_mm alone", lambda: scaled_matmul(qx, ix, qw, iw, torch.bfloat16, True)),
            ("bf16 mm alone", lambda: x.detach() @ w.detach().t())):
        print(f"{name}: {median_ms(fn):.3f}")
    E, D, I, T = 64, 2048, 2 * 704, 6 * 8192
    xs = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    we = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offs = torch.cumsum(torch.full((E,), T // E, device="cuda", dtype=torch.int32), 0)
    offs = offs.to(torch.int32)
    dye = torch.randn(T, I, device="cuda", dtype=torch.bfloat16)
    for name, fn in (
            ("bf16 grouped fwd+bwd", lambda: torch._grouped_mm(xs, we, offs=offs).backward(dye)),
            ("fp8 grouped fwd+bwd",
             lambda: fp8_grouped_mm(xs, we, offs=offs, kernel=True).backward(dye)),
            ("fp8 grouped fwd",
             lambda: fp8_grouped_mm(xs.detach(), we.detach(), offs=offs, kernel=True))):
        print(f"{name}: {median_ms(fn):.3f}")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("fp8_gemm_study.py: needs a CUDA GPU (sm90 for the grouped kernel)")
    print(torch.cuda.get_device_name(), torch.__version__)
    accuracy()
    timing()


if __name__ == "__main__":
    main()
