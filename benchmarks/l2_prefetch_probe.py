"""Does prefetching a projection's weight into L2, beside the latency-bound kernels that precede
it, make a batch-1 decode layer faster? (moeflow.ops.l2_prefetch_triton)

A stand-in for the attention half of a Qwen3-30B-A3B decode layer, captured as a CUDA graph of
LAYERS layers, each with its own weights: qkv projection (x [1, 2048] · [5120, 2048]ᵀ, cuBLAS)
→ CHAIN small kernels (the q/k norm and the attention's split and merge kernels stand here as
tiny elementwise ops) → output projection (x [1, 4096] · [2048, 4096]ᵀ, the stream kernel)
→ a 75 MB weight read (the experts' up and down at batch 1, cuBLAS), which also evicts L2.
Variants:
- serial: as above;
- prefetch_o: the output projection's weight prefetched on a side stream forked after the qkv
  projection, joined before the output projection;
- prefetch_o_early: forked before the qkv projection (competes with it for HBM);
- prefetch_o_qkv: as prefetch_o, and the next layer's qkv weight prefetched beside the small
  kernels that follow the expert read (here: CHAIN more tiny ops before the next layer).
Per variant: the replay's median time per layer (CUDA events, 30 replays), and each kernel's mean
duration from the profiler's records of one replay.

    PYTHONPATH=. python benchmarks/l2_prefetch_probe.py --out DIR [--chain 3 6] [--layers 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import cuda_event_ms, cuda_kernel_events  # noqa: E402

from moeflow.ops.l2_prefetch_triton import prefetch_l2  # noqa: E402
from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402

D, Q, KV, EXPERT_ROWS = 2048, 4096, 1024, 18432  # 18432 × 2048 × 2 B = 75.5 MB


def build_layers(n: int, device) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, device=device, generator=g) * 0.02).to(torch.bfloat16)
    return [{"qkv": w(Q + KV, D), "o": w(D, Q), "experts": w(EXPERT_ROWS, D)} for _ in range(n)]


def make_step(layers, variant: str, chain: int):
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    small = torch.zeros(1, Q, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def fork(fn):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fn()

    def join():
        torch.cuda.current_stream().wait_stream(side)

    def step():
        h = x
        for i, layer in enumerate(layers):
            if variant == "prefetch_o_early":
                fork(lambda: prefetch_l2(layer["o"]))
            qkv = F.linear(h, layer["qkv"])
            if variant in ("prefetch_o", "prefetch_o_qkv"):
                fork(lambda: prefetch_l2(layer["o"]))
            a = small
            for _ in range(chain):
                a = a * 1.0001
            a = a + qkv[:, :Q]
            if variant != "serial":
                join()
            o = linear_stream(a, layer["o"])
            e = F.linear(o, layer["experts"])
            if variant == "prefetch_o_qkv" and i + 1 < len(layers):
                nxt = layers[i + 1]["qkv"]
                fork(lambda: prefetch_l2(nxt))
            b = e[:, :D]
            for _ in range(chain):
                b = b * 1.0001
            if variant == "prefetch_o_qkv":
                join()
            h = b
        return h
    return step


def capture(step):
    for _ in range(3):  # autotune and compile outside the capture
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def kernel_means(graph) -> dict:
    by = defaultdict(list)
    for k in cuda_kernel_events(graph.replay):
        by[k.name[:60]].append(k.time_range.elapsed_us())
    return {name: {"count": len(v), "mean_us": round(sum(v) / len(v), 2)}
            for name, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chain", type=int, nargs="+", default=[3, 6])
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    layers = build_layers(args.layers, "cuda")
    rows = []
    for chain in args.chain:
        for variant in ("serial", "prefetch_o", "prefetch_o_early", "prefetch_o_qkv"):
            graph = capture(make_step(layers, variant, chain))
            ms = cuda_event_ms(graph.replay, reps=30, warmup=5)
            row = {"chain": chain, "variant": variant,
                   "us_per_layer": round(ms * 1000 / args.layers, 2),
                   "kernels": kernel_means(graph)}
            rows.append(row)
            print(f"chain {chain} {variant:17s} {row['us_per_layer']:7.2f} us/layer  " +
                  "  ".join(f"{n[:28]} {v['mean_us']}" for n, v in
                            list(row["kernels"].items())[:5]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    (args.out / "l2_prefetch_probe.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                                indent=1))


if __name__ == "__main__":
    main()
