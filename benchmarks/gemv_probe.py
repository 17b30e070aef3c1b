"""Batch-1 decode projections as register GEMVs: does a multiply-and-sum in registers (no tensor
cores, every weight load of a program issued up front) read the weights faster than the
tl.dot stream kernels and cuBLAS?

The stream kernels (moeflow.ops.skinny_linear_triton, moeflow.ops.grouped_mlp_triton) pad one
row to a 16-row MMA tile and pipeline BLOCK_K chunks of the weight through shared memory; at
batch 1 of Qwen3-30B-A3B they reach 1.7-3.3 TB/s (output projection 9.8 µs for 16.8 MB, expert
up 15.2 µs for 50 MB: benchmarks/results/decode_timeline), where a large copy reaches ~4.2. The
register GEMV here loads [BLOCK_N, BLOCK_K] (or [BLOCK_K, BLOCK_N]) weight tiles straight into
registers, multiplies by x in fp32 and sums at the end. Per shape, one row:

- dense `W [N, K] · x` (the attention's qkv 2048 -> 5120 and output 4096 -> 2048): F.linear,
  linear_stream (autotuned), and the register GEMV over a sweep of tiles/warps;
- expert `x · W_e [D, 2F]` + SwiGLU (up) and `h · W_e [F, D]` (down) for 8 experts of 128
  (Qwen3-30B-A3B: D 2048, F 768): the stream kernels (expert_mlp_stream, one token routed to 8
  experts) against register GEMVs of the same work.

Each call reads weights not in L2 (copies cycled inside one CUDA graph); µs per call is the
median over replays. Max |difference| against fp32 math is printed for each winner.

    PYTHONPATH=. python benchmarks/gemv_probe.py --out $OUT    # one H200: ~2 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import time_per_call  # noqa: E402

from moeflow.ops.grouped_mlp_triton import expert_mlp_stream  # noqa: E402
from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402


@triton.jit
def _gemv_nk(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + kk).to(tl.float32)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + (k0 + kk)[None, :])
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


@triton.jit
def _expert_program(e_ptr, w_ptr, expert_elems, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): row i, its expert's weight (experts[i], `expert_elems` each), column
    tile j, and the K offsets of one chunk."""
    i = tl.program_id(0)
    e = tl.load(e_ptr + i).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return i, w_ptr + e * expert_elems, n, tl.arange(0, BLOCK_K)


@triton.jit
def _up_gemv(x_ptr, e_ptr, w_ptr, h_ptr, D: tl.constexpr, F: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row i of h = silu(x · W_e[:, n]) * (x · W_e[:, F + n]), e = experts[i]; x one row."""
    i, w_e, n, kk = _expert_program(e_ptr, w_ptr, D * 2 * F, BLOCK_N, BLOCK_K)
    acc_g = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        x = tl.load(x_ptr + k0 + kk).to(tl.float32)[:, None]
        rows = w_e + (k0 + kk)[:, None] * 2 * F
        acc_g += tl.load(rows + n[None, :]).to(tl.float32) * x
        acc_u += tl.load(rows + F + n[None, :]).to(tl.float32) * x
    g = tl.sum(acc_g, axis=0)
    u = tl.sum(acc_u, axis=0)
    tl.store(h_ptr + i * F + n, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty))


@triton.jit
def _down_gemv(h_ptr, e_ptr, w_ptr, y_ptr, D: tl.constexpr, F: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i, w_e, n, kk = _expert_program(e_ptr, w_ptr, F * D, BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, F, BLOCK_K):
        h = tl.load(h_ptr + i * F + k0 + kk).to(tl.float32)[:, None]
        acc += tl.load(w_e + (k0 + kk)[:, None] * D + n[None, :]).to(tl.float32) * h
    tl.store(y_ptr + i * D + n, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty))


def _sweep(name, calls, make_fn, configs, device):
    """[(config, µs)] for each config that compiles, best first."""
    out = []
    for cfg in configs:
        try:
            fn = make_fn(cfg)
            fn()
            torch.cuda.synchronize()
            out.append((cfg, time_per_call(fn, calls, device)))
        except Exception as err:  # noqa: BLE001  (a config that does not fit: skipped, named)
            print(f"{name} {cfg}: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                  flush=True)
    return sorted(out, key=lambda r: r[1])


def dense(device, results):
    for name, K, N, copies in (("qkv 2048->5120", 2048, 5120, 24),
                               ("o 4096->2048", 4096, 2048, 32)):
        ws = [torch.randn(N, K, device=device, dtype=torch.bfloat16) / K ** 0.5
              for _ in range(copies)]
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        y = torch.empty(1, N, device=device, dtype=torch.bfloat16)
        exact = x.float() @ ws[0].float().t()
        row = {"shape": name, "MB": N * K * 2 / 1e6}
        row["cublas_us"] = time_per_call(lambda: [F.linear(x, w) for w in ws], copies, device)
        row["stream_us"] = time_per_call(lambda: [linear_stream(x, w) for w in ws], copies,
                                         device)
        configs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
                   for bn, bk, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (4, 8, 16))
                   if 32 * w * 8 <= bn * bk <= 16384 and K % bk == 0]

        def make(cfg):
            grid = (N // cfg["BLOCK_N"],)
            return lambda: [_gemv_nk[grid](x, w, y, N, K, **cfg) for w in ws]
        sweep = _sweep(name, copies, make, configs, device)
        best, best_us = sweep[0]
        _gemv_nk[(N // best["BLOCK_N"],)](x, ws[0], y, N, K, **best)
        row.update(gemv_us=best_us, gemv_cfg=best, top5=[(c, round(t, 2)) for c, t in sweep[:5]],
                   gemv_err=(y.float() - exact).abs().max().item(),
                   cublas_err=(F.linear(x, ws[0]).float() - exact).abs().max().item())
        print(json.dumps(row), flush=True)
        results.append(row)


def experts(device, results):
    E, D, Fd, K = 128, 2048, 768, 8
    w_in = torch.randn(E, D, 2 * Fd, device=device, dtype=torch.bfloat16) / D ** 0.5
    w_out = torch.randn(E, Fd, D, device=device, dtype=torch.bfloat16) / Fd ** 0.5
    sets = torch.randperm(E, generator=torch.Generator().manual_seed(0)).view(16, K)
    picks = [s.sort().values.to(device) for s in sets]  # 16 disjoint sets of 8: 1.2 GB read
    x = torch.randn(1, D, device=device, dtype=torch.bfloat16)
    rows = torch.zeros(K, dtype=torch.int64, device=device)
    ends = []
    for p in picks:
        counts = torch.zeros(E, dtype=torch.int64, device=device)
        counts[p] = 1
        ends.append(counts.cumsum(0))
    calls = len(picks)
    stream = time_per_call(lambda: [expert_mlp_stream(x, en, w_in, None, w_out, None, "swiglu",
                                                      rows_N=rows) for en in ends],
                           calls, device)
    h = torch.empty(K, Fd, device=device, dtype=torch.bfloat16)
    y = torch.empty(K, D, device=device, dtype=torch.bfloat16)
    up_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
               for bn, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))
               if 2 * bn * bk <= 16384 and D % bk == 0]

    def make_up(cfg):
        grid = (K, Fd // cfg["BLOCK_N"])
        return lambda: [_up_gemv[grid](x, p, w_in, h, D, Fd, **cfg) for p in picks]

    def make_down(cfg):
        grid = (K, D // cfg["BLOCK_N"])
        return lambda: [_down_gemv[grid](h, p, w_out, y, D, Fd, **cfg) for p in picks]
    up = _sweep("up", calls, make_up, up_cfgs, device)
    down_cfgs = [c for c in up_cfgs if Fd % c["BLOCK_K"] == 0]
    down = _sweep("down", calls, make_down, down_cfgs, device)
    # correctness of the winners against fp32 math for picks[0]
    p = picks[0]
    _up_gemv[(K, Fd // up[0][0]["BLOCK_N"])](x, p, w_in, h, D, Fd, **up[0][0])
    _down_gemv[(K, D // down[0][0]["BLOCK_N"])](h, p, w_out, y, D, Fd, **down[0][0])
    hx = x.float() @ w_in[p].float()  # [K, 1, 2F] via broadcasting below
    hx = hx.squeeze(1)
    h_ref = F.silu(hx[:, :Fd]) * hx[:, Fd:]
    y_ref = torch.einsum("kf,kfd->kd", h.float(), w_out[p].float())
    row = {"shape": "experts T=1 k=8 (qwen3)", "MB_up": K * D * 2 * Fd * 2 / 1e6,
           "MB_down": K * Fd * D * 2 / 1e6, "stream_up+down_us": stream,
           "gemv_up_us": up[0][1], "gemv_up_cfg": up[0][0],
           "gemv_down_us": down[0][1], "gemv_down_cfg": down[0][0],
           "up_top5": [(c, round(t, 2)) for c, t in up[:5]],
           "down_top5": [(c, round(t, 2)) for c, t in down[:5]],
           "h_err": (h.float() - h_ref).abs().max().item(),
           "y_err": (y.float() - y_ref).abs().max().item()}
    print(json.dumps(row), flush=True)
    results.append(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.manual_seed(0)
    results = [{"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__}]
    dense(device, results)
    experts(device, results)
    (args.out / "gemv_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
