"""The one-launch decode router against the multi-kernel path it replaces, timed on one GPU.

    PYTHONPATH=. python benchmarks/decode_route.py --out DIR

Shape: the Qwen3-30B-A3B MoE layer (D 2048, 128 experts, top-8 renormalised, expert F 768,
SwiGLU, bf16, dropless inference). Two tables, each eager (every launch paid by the host) and
replayed from a CUDA graph (what the serving engine runs at decode: launch gaps only):
- `route+plan`: from fp32 logits to the dispatch plan with the tokens' rows in expert order —
  before: route_triton (top-k, queue, finalize) + dispatch_triton (plan + gather);
  after: route_decode_triton alone (one program; its plan needs no gather launch, the up
  kernel loads the rows through token_N, a cost the layer table includes).
  Timed at T·K from 8 to 1024, beyond moeflow.ops.backend.DECODE_ROUTE_MAX_ASSIGNMENTS (512),
  to check that bound: above the crossing the one program is slower than the launches it saves.
- `layer`: the whole MoE layer forward, Backends() (auto: the decode path up to the bound)
  against Backends(router="triton") (the path before), at T = 1, 8, 16, 64.
Times: median of CUDA-event-timed calls (moeflow's benchmarks/moe_layer.py time_fn). Writes
DIR/decode_route_<GPU>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_layer import time_fn  # noqa: E402
from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops.decode_route_triton import route_decode_triton  # noqa: E402
from moeflow.ops.permute_triton import dispatch_triton  # noqa: E402
from moeflow.ops.routing_triton import route_triton  # noqa: E402

D, F, E, K = 2048, 768, 128, 8
CFG = RouterConfig(top_k=K, normalize_topk=True, dropless=True, aux_loss_coef=0.001)


def graphed(fn):
    """fn replayed from a CUDA graph (warmed up first: compilation and autotuning)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay


def both(fn) -> dict:
    return {"eager_us": 1e3 * time_fn(fn), "graph_us": 1e3 * time_fn(graphed(fn), warmup=1)}


def route_plan_table(tokens: list[int]) -> dict:
    out = {}
    for T in tokens:
        logits = torch.randn(T, E, device="cuda")
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

        def before():
            r = route_triton(logits, CFG, None, None, None, None)
            dispatch_triton(x, r.ids_TK, r.slots_TK, r.kept_TK, r.counts_E, may_drop=False)

        def after():
            route_decode_triton(logits, CFG, None)

        with torch.no_grad():
            out[T * K] = {"T": T, "before": both(before), "after": both(after)}
        print(f"route+plan T·K={T * K:5d}: {out[T * K]}", flush=True)
    return out


def layer_table(tokens: list[int]) -> dict:
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, router=CFG)
    layer = MoELayer(spec, D, "swiglu", False).cuda().eval()
    for p in layer.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    layer = layer.bfloat16()
    out = {}
    for T in tokens:
        x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
        row = {}
        ys = {}
        for label, backends in (("before", Backends(router="triton")), ("after", Backends())):
            set_backends(layer, backends)

            def fwd():
                with torch.no_grad():
                    return layer(x, inference=True)[0]

            ys[label] = fwd()
            row[label] = both(fwd)
        row["outputs_equal"] = bool(torch.equal(ys["before"], ys["after"]))
        diff = (ys["after"].float() - ys["before"].float()).norm() / ys["before"].float().norm()
        row["rel_diff"] = diff.item()
        out[T] = row
        print(f"layer T={T:3d}: {row}", flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [f"# Decode router, {result['gpu']}, {result['date']}", "",
             f"`{result['command']}`", "",
             "## route + plan (µs; before = route_triton + dispatch_triton)", "",
             "| T·K | before eager | after eager | before graph | after graph |",
             "|---:|---:|---:|---:|---:|"]
    for n, row in result["route_plan"].items():
        b, a = row["before"], row["after"]
        lines.append(f"| {n} | {b['eager_us']:.1f} | {a['eager_us']:.1f} | "
                     f"{b['graph_us']:.1f} | {a['graph_us']:.1f} |")
    lines += ["", "## MoE layer forward (µs; before = Backends(router='triton'))", "",
              "| T | before eager | after eager | before graph | after graph | equal | rel diff |",
              "|---:|---:|---:|---:|---:|:---:|---:|"]
    for T, row in result["layer"].items():
        b, a = row["before"], row["after"]
        lines.append(f"| {T} | {b['eager_us']:.1f} | {a['eager_us']:.1f} | "
                     f"{b['graph_us']:.1f} | {a['graph_us']:.1f} | {row['outputs_equal']} | "
                     f"{row['rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--route-tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--layer-tokens", default="1,8,16,64")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    result = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": " ".join(["python"] + sys.argv),
              "route_plan": route_plan_table([int(t) for t in args.route_tokens.split(",")]),
              "layer": layer_table([int(t) for t in args.layer_tokens.split(",")])}
    stem = out / f"decode_route_{gpu.replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
