"""Would the down kernel's epilogue doing the combine pay? One H200 probe, Qwen3-30B-A3B layer.

At a 2048-token prefill the tiled down kernel writes y [T·K, D] (67 MB in bf16) and the combine
kernel reads it back to sum each token's K rows with their weights: ~140 MB of the ~560 MB the
two move per layer. The variant here scales each row by its routing weight in the down kernel's
epilogue and adds it into a zeroed fp32 [T, D] buffer with atomics (16 MB, L2-resident), then
casts to bf16. The price: the K additions per output meet in whatever order the programs run,
so the result is not bitwise reproducible run to run (fp32 sums of eight terms, then rounded to
bf16).

Times (median CUDA-event ms of ≥ 20 calls after autotuning), same inputs:
  base:   _down_tiled_kernel → y [N, D] bf16, then combine_triton → [T, D] bf16
  atomic: zeros fp32 [T, D], the atomic down kernel, .to(bf16)
and each output's relative L2 error against an fp32 reference of the same h, weights and
routing, and how many bf16 values differ between two atomic runs.

    PYTHONPATH=. python benchmarks/down_combine_probe.py [--tokens 512 2048 8192] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import cuda_event_ms  # noqa: E402
from moeflow.config import RouterConfig  # noqa: E402
from moeflow.ops.grouped_mlp_triton import tune_keys  # noqa: E402
from moeflow.ops.tiled_mlp_triton import (_down_tiled_kernel, _expert_tile,  # noqa: E402
                                          _tiled_configs, _tiled_grid)
from moeflow.ops.permute_triton import combine_triton  # noqa: E402
from moeflow.ops.routing_triton import route_triton  # noqa: E402

D, F, E, K = 2048, 768, 128, 8


@triton.autotune(configs=_tiled_configs(accumulators=1), key=["D", "F", "E", "M_BUCKET"],
                 reset_to_zero=["y_ptr"])
@triton.jit
def _down_atomic_kernel(h_ptr, ends_ptr, w_ptr, token_ptr, wrow_ptr, y_ptr, D, F, E, M_BUCKET,
                        BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    e, m0, hi, pid_n = _expert_tile(ends_ptr, tl.program_id(0), E, tl.cdiv(D, BLOCK_N),
                                    BLOCK_E, BLOCK_M)
    if m0 >= hi:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    w_e = w_ptr + e.to(tl.int64) * F * D
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < hi
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < F
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_e + k[:, None] * D + n[None, :], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc)
    tok = tl.load(token_ptr + rows, mask=rmask, other=0)
    wr = tl.load(wrow_ptr + rows, mask=rmask, other=0.0)
    tl.atomic_add(y_ptr + tok[:, None] * D + n[None, :], acc * wr[:, None],
                  mask=rmask[:, None] & nmask[None, :], sem="relaxed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", nargs="*", type=int, default=[512, 2048, 8192])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    w_out = (torch.randn(E, F, D, device=dev) * F ** -0.5).to(bf)
    cfg = RouterConfig(top_k=K, normalize_topk=True, dropless=True)
    rows_out = []
    for T in args.tokens:
        logits = torch.randn(T, E, device=dev)
        with torch.no_grad():
            r = route_triton(logits, cfg, None, None, None, None)
        order = r.order
        N = T * K
        h = torch.randn(N, F, device=dev).to(bf)
        w_row = torch.empty(N, device=dev)
        w_row[order.row_TK.flatten()] = r.weights_TK.flatten()
        keys, block_e = tune_keys(N, E), triton.next_power_of_2(E)
        y_ND = torch.empty(N, D, device=dev, dtype=bf)

        def base():
            _down_tiled_kernel[_tiled_grid(N, E, D)](
                h, order.ends_E, w_out, w_out, y_ND, D, F, E, *keys, HAS_BIAS=False,
                BLOCK_E=block_e, PDL=False)
            return combine_triton(y_ND, r.weights_TK, order.row_TK, r.kept_TK)

        def atomic():
            y32 = torch.zeros(T, D, device=dev)
            _down_atomic_kernel[_tiled_grid(N, E, D)](
                h, order.ends_E, w_out, order.token_N, w_row, y32, D, F, E, keys[0],
                BLOCK_E=block_e)
            return y32.to(bf)

        # fp32 reference: y[t] = Σ_k w_tk · h[row_tk] · W[e_tk]
        ref = torch.zeros(T, D, device=dev)
        hf, wf = h.float(), w_out.float()
        for e in range(E):
            lo = 0 if e == 0 else int(order.ends_E[e - 1])
            hi = int(order.ends_E[e])
            if hi > lo:
                ref.index_add_(0, order.token_N[lo:hi],
                               (hf[lo:hi] @ wf[e]) * w_row[lo:hi, None])
        base(), atomic()  # autotune first (its benchmark runs add into the buffer)
        out_b, out_a, out_a2 = base(), atomic(), atomic()
        err = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        row = {"tokens": T, "base_ms": cuda_event_ms(base, reps=20, warmup=3),
               "atomic_ms": cuda_event_ms(atomic, reps=20, warmup=3),
               "base_rel_err": err(out_b), "atomic_rel_err": err(out_a),
               "atomic_runs_differ": int((out_a != out_a2).sum()),
               "base_cfg": str(_down_tiled_kernel.best_config),
               "atomic_cfg": str(_down_atomic_kernel.best_config)}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                              "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
