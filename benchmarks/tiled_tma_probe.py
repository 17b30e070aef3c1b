"""Would TMA descriptors speed up the tiled expert kernels? A probe, not a product path.

    PYTHONPATH=. python benchmarks/tiled_tma_probe.py OUT.json      # one CUDA GPU, ~1 min

Variants of moeflow.ops.tiled_mlp_triton's `_up_tiled_kernel` / `_down_tiled_kernel` (same
program order, `_expert_tile`) that load the expert weight tiles — and in the down kernel the
activation rows — through `tl.make_tensor_descriptor` (the Hopper TMA engine) instead of pointer
tiles, autotuned over the product configs plus BLOCK_K = 128 ones, on the Qwen3-30B-A3B expert
shape (D 2048, F 768, E 128, top-8, SwiGLU, bf16) at 1024-8192 tokens with random routing.
Prints and writes, per token count, the median CUDA-event time of both (up + down, including the
launches), the chosen configs and both outputs' relative error to an fp32 reference.
Result on the H200 (2026-12-02, benchmarks/results/prefill_experts/README.md): 0.97-1.02x the
pointer kernels' time, so the product kernels keep pointer loads."""
import json
import sys

import torch
import triton
import triton.language as tl

from machine import cuda_event_ms
from moeflow.ops import tiled_mlp_triton as g
from moeflow.ops.grouped_mlp_triton import m_bucket
from moeflow.ops.tiled_mlp_triton import _expert_tile, _tiled_grid

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def cfgs(acc):
    tiles = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4),
             (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3),
             (128, 256, 64, 8, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3),
             (64, 256, 128, 8, 2), (128, 64, 128, 8, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles if acc * bm * bn <= 128 * 32 * w]


@triton.autotune(configs=cfgs(2), key=["D", "F", "E", "M_BUCKET"])
@triton.jit
def up_tma(x_ptr, token_ptr, ends_ptr, w_ptr, h_ptr, D, F, E, M_BUCKET,
           BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):
    e, m0, hi, pid_n = _expert_tile(ends_ptr, tl.program_id(0), E, tl.cdiv(F, BLOCK_N), BLOCK_E,
                                    BLOCK_M)
    if m0 >= hi:
        return
    I = 2 * F
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * D, I], strides=[I, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < hi
    src = tl.load(token_ptr + rows, mask=rmask, other=0)
    n0 = pid_n * BLOCK_N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    wrow = e * D
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + src[:, None].to(tl.int64) * D + k[None, :], mask=rmask[:, None],
                    other=0.0)
        acc_g = tl.dot(a, w_desc.load([wrow + k0, n0]), acc_g)
        acc_u = tl.dot(a, w_desc.load([wrow + k0, F + n0]), acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    n = n0 + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + n[None, :], act.to(h_ptr.dtype.element_ty),
             mask=rmask[:, None] & (n < F)[None, :])


@triton.autotune(configs=cfgs(1), key=["D", "F", "E", "M_BUCKET"])
@triton.jit
def down_tma(h_ptr, ends_ptr, w_ptr, y_ptr, N, D, F, E, M_BUCKET,
             BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    e, m0, hi, pid_n = _expert_tile(ends_ptr, tl.program_id(0), E, tl.cdiv(D, BLOCK_N), BLOCK_E,
                                    BLOCK_M)
    if m0 >= hi:
        return
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, F], strides=[F, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * F, D], strides=[D, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    n0 = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, F, BLOCK_K):
        acc = tl.dot(h_desc.load([m0, k0]), w_desc.load([e * F + k0, n0]), acc)
    rows = m0 + tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < hi)[:, None] & (n < D)[None, :])


def tma_mlp(x, token_N, ends, w_in, w_out):
    N = token_N.shape[0]
    D = x.shape[1]
    E, F = w_out.shape[0], w_out.shape[1]
    h = torch.empty(N, F, dtype=x.dtype, device=x.device)
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)
    b = m_bucket(N, E)
    be = triton.next_power_of_2(E)
    up_tma[_tiled_grid(N, E, F)](x, token_N, ends, w_in, h, D, F, E, b, BLOCK_E=be)
    down_tma[_tiled_grid(N, E, D)](h, ends, w_out, y, N, D, F, E, b, BLOCK_E=be)
    return y


def main():
    torch.manual_seed(0)
    D, F, E, K = 2048, 768, 128, 8
    w_in = (torch.randn(E, D, 2 * F, device="cuda") * 0.02).bfloat16()
    w_out = (torch.randn(E, F, D, device="cuda") * 0.02).bfloat16()
    out = []
    for T in (1024, 2048, 4096, 8192):
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices.reshape(-1)
        order = torch.argsort(ids, stable=True)
        token_N = order // K
        ends = torch.cumsum(torch.bincount(ids, minlength=E), 0)
        base = lambda: g.expert_mlp_tiled(x, ends, w_in, None, w_out, None, "swiglu",  # noqa
                                          rows_N=token_N)
        new = lambda: tma_mlp(x, token_N, ends, w_in, w_out)  # noqa
        yb, yn = base(), new()
        xr = x[token_N].float()
        ref_parts = []
        for e in range(E):
            lo = 0 if e == 0 else int(ends[e - 1])
            hi = int(ends[e])
            hh = xr[lo:hi] @ w_in[e].float()
            a = torch.nn.functional.silu(hh[:, :F]) * hh[:, F:]
            ref_parts.append(a.bfloat16().float() @ w_out[e].float())
        ref = torch.cat(ref_parts)
        err = lambda y: float((y.float() - ref).norm() / ref.norm())  # noqa
        tb, tn = (cuda_event_ms(f, reps=30, warmup=3) for f in (base, new))
        row = dict(T=T, rows_per_expert=T * K / E, tiled_ms=tb, tma_ms=tn, ratio=tn / tb,
                   err_tiled=err(yb), err_tma=err(yn),
                   up_cfg=str(up_tma.best_config), down_cfg=str(down_tma.best_config),
                   base_up=str(g._up_tiled_kernel.best_config),
                   base_down=str(g._down_tiled_kernel.best_config))
        print(json.dumps(row), flush=True)
        out.append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
