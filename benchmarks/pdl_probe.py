"""What programmatic dependent launch (moeflow.ops.pdl) saves in a replayed decode graph.

The decode MoE layer's kernels (Qwen3-30B-A3B shape: D 2048, F 768, 128 experts, top-8
renormalised, SwiGLU, bf16) for `--layers` layers, each with its own weights (so L2 holds none
of them from one layer to the next), chained as a decode step chains them: the fused router
(logits, top-k and plan in one launch), the stream up and down kernels, the weighted combine,
its output the next layer's input; `--extras` adds other kinds of graph nodes (a memset, torch
elementwise kernels, cuBLAS GEMMs: what an engine step holds besides them). One CUDA graph of
the chain per setting, launched without and with PDL; per setting: the replay's CUDA-event
time (median of `--reps`), the profiler's kernel timeline of one replay (kernels, busy µs, idle
gaps), and whether the outputs equal the plain launch's bit for bit (they must: PDL changes
when programs start, not what they compute).

    PYTHONPATH=. python benchmarks/pdl_probe.py --out DIR [--layers 16] [--tokens 1 16]
        [--extras none memset torch_add cublas]

Writes DIR/pdl_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cuda_event_ms  # noqa: E402
from moeflow.config import RouterConfig  # noqa: E402
from moeflow.ops.decode_route_triton import route_decode_fused  # noqa: E402
from moeflow.ops.grouped_mlp_triton import expert_mlp_stream  # noqa: E402
from moeflow.ops.pdl import pdl_supported  # noqa: E402
from moeflow.ops.permute_triton import combine_triton  # noqa: E402

D, F, E, K = 2048, 768, 128, 8
CFG = RouterConfig(top_k=K, normalize_topk=True, dropless=True)


def make_layers(n: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, std):
        return (torch.randn(*shape, device="cuda", generator=g) * std).bfloat16()

    return [{"gate": rand(E, D, std=D ** -0.5), "w_in": rand(E, D, 2 * F, std=D ** -0.5),
             "w_out": rand(E, F, D, std=F ** -0.5), "dense": rand(D, D, std=D ** -0.5)}
            for _ in range(n)]


def chain(layers: list[dict], x: torch.Tensor, ticket: torch.Tensor, pdl: bool,
          extra: str) -> torch.Tensor:
    """The layers' kernels; `extra` adds other work to the graph: "memset" one memset node
    first, "torch_add" a torch elementwise kernel per layer, "cublas" a cuBLAS GEMM per layer
    (a [D, D] weight), the kinds of nodes an engine step has besides these kernels."""
    if extra == "memset":
        x = x + torch.zeros(1, device=x.device, dtype=x.dtype)
    for layer in layers:
        routing, _ = route_decode_fused(x, layer["gate"], CFG, None, ticket, pdl=pdl)
        order = routing.order
        y = expert_mlp_stream(x, order.ends_E, layer["w_in"], None, layer["w_out"], None,
                              "swiglu", rows_N=order.token_N, pdl=pdl)
        x = combine_triton(y, routing.weights_TK, order.row_TK, routing.kept_TK, pdl=pdl)
        if extra == "torch_add":
            x = x + 1.0
        elif extra == "cublas":
            x = x @ layer["dense"]
    return x


def timeline(fn) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                 and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    if not ks:
        return {"kernels": 0}
    gaps, end = 0.0, ks[0].time_range.start
    by_name: dict = {}
    for k in ks:
        gaps += max(0.0, k.time_range.start - end)
        end = max(end, k.time_range.end)
        row = by_name.setdefault(k.name[:40], [0, 0.0])
        row[0] += 1
        row[1] += k.time_range.elapsed_us()
    return {"kernels": len(ks), "busy_us": round(sum(k.time_range.elapsed_us() for k in ks), 1),
            "gaps_us": round(gaps, 1),
            "span_us": round(ks[-1].time_range.end - ks[0].time_range.start, 1),
            "mean_us": {n: round(t / c, 2) for n, (c, t) in by_name.items()}}


def measure(layers: list[dict], T: int, reps: int, extra: str) -> dict:
    x = torch.randn(T, D, device="cuda").bfloat16()
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    out: dict = {"T": T, "extra": extra}
    outputs = {}
    for pdl in (False, True):
        with torch.no_grad():
            for _ in range(2):  # compile, autotune
                chain(layers, x, ticket, pdl, extra)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = chain(layers, x, ticket, pdl, extra)
        graph.replay()
        torch.cuda.synchronize()
        outputs[pdl] = y.clone()
        label = "pdl" if pdl else "plain"
        out[label] = {"replay_ms": cuda_event_ms(graph.replay, reps, warmup=3),
                      **timeline(graph.replay)}
        print(f"T={T} {extra} {label}: {out[label]}", flush=True)
    out["outputs_equal"] = bool(torch.equal(outputs[False], outputs[True]))
    return out


def markdown(res: dict) -> str:
    lines = [f"# PDL probe — {res['gpu']}, {res['date']}", "",
             f"`{res['command']}`; {res['layers']} decode MoE layers (Qwen3-30B-A3B shape), "
             "route → up → down → combine each, one CUDA graph.", "",
             "| T | extra nodes | launch | replay ms | kernels | busy µs | gaps µs | span µs | "
             "µs / layer | outputs equal |", "|---:|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in res["cells"]:
        for label in ("plain", "pdl"):
            c = r[label]
            lines.append(f"| {r['T']} | {r['extra']} | {label} | {c['replay_ms']:.4f} | "
                         f"{c.get('kernels')} | "
                         f"{c.get('busy_us')} | {c.get('gaps_us')} | {c.get('span_us')} | "
                         f"{1e3 * c['replay_ms'] / res['layers']:.2f} | {r['outputs_equal']} |")
    lines += ["", "Mean kernel µs:", ""]
    for r in res["cells"]:
        for label in ("plain", "pdl"):
            lines.append(f"- T={r['T']} {r['extra']} {label}: {r[label].get('mean_us')}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--extras", nargs="+", default=["none", "memset", "torch_add", "cublas"],
                    help="other nodes in the graph (see chain)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not pdl_supported(torch.empty(0, device="cuda")):
        sys.exit("pdl_probe: needs a CUDA GPU of sm_90 or newer")
    layers = make_layers(args.layers)
    res = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "command": "python " + " ".join(sys.argv), "layers": args.layers,
           "cells": [measure(layers, T, args.reps, extra) for T in args.tokens
                     for extra in args.extras]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pdl_probe.json").write_text(json.dumps(res, indent=1))
    (out / "pdl_probe.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
