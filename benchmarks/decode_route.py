"""The one-launch decode router against the multi-kernel path it replaces, timed on one GPU.

    PYTHONPATH=. python benchmarks/decode_route.py --out DIR

Shape: the Qwen3-30B-A3B MoE layer (D 2048, 128 experts, top-8 renormalised, expert F 768,
SwiGLU, bf16, dropless inference). Three tables, each eager (every launch paid by the host) and
replayed from a CUDA graph (what the serving engine runs at decode: launch gaps only):
- `route+plan`: from fp32 logits to the dispatch plan with the tokens' rows in expert order —
  before: route_triton (top-k, queue, finalize) + dispatch_triton (plan + gather);
  after: route_decode_triton alone (one program; its plan needs no gather launch, the up
  kernel loads the rows through token_N, a cost the layer table includes).
  Timed at T·K from 8 to 1024, beyond moeflow.ops.backend.DECODE_ROUTE_MAX_ASSIGNMENTS (256),
  to check that bound: above the crossing the one program is slower than the launches it saves.
- `logits+route`: from the layer input x (bf16) and the gate weight to the plan — unfused:
  router_logits (casts, GEMV, nan_to_num) + route_decode_triton; fused: route_decode_fused
  (one launch: logits tiles over many programs, the last one routes), at the same T·K.
- `warps` (with --sweep-warps): route_decode_fused's kernel time (the profiler's CUPTI records,
  median of eager calls, each after an L2 flush) with the warps forced
  (decode_route_fused_triton.route_warps, which also sizes the logits tiles) to each of 1, 2, 4,
  8 and the gate bytes per logits program (_GATE_BYTES_PER_PROGRAM) to each of GATE_BYTES, its
  choices compared with the default's; both constants come from this table. Also
  route_decode_triton (the routing program alone, on precomputed logits) at each warp count (its
  ONE_PROGRAM_WARPS forced): in the fused kernel one count serves both the logits programs and
  the routing program, so this separates what the routing program alone would prefer. (An
  earlier version timed single-kernel CUDA graphs with events: their replay overhead, ±5 µs from
  call to call, buried the kernels' differences.)
- `layer`: the whole MoE layer forward, Backends(router="triton") (before the decode router),
  Backends(router="triton_decode") (what auto takes now) and
  Backends(router="triton_decode_fused"), at T = 1, 8, 16, 64, with the CUDA kernels each
  launches per forward (profiled eager call; expect 4 for fused, 9 for triton_decode at T = 1)
  and each path's relative difference to "before" (fused: also whether its choices equal
  triton_decode's; a near-tie may differ, the logits' sum order is not cuBLAS's).
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
from moeflow.model.router import router_logits  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops import decode_route_fused_triton, decode_route_triton  # noqa: E402
from moeflow.ops.decode_route_fused_triton import route_decode_fused, route_tickets  # noqa: E402
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


def logits_route_table(tokens: list[int]) -> dict:
    out = {}
    torch.manual_seed(0)
    gate = (torch.randn(E, D, device="cuda") * D ** -0.5).bfloat16()
    ticket = route_tickets("cuda")
    for T in tokens:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

        def unfused():
            route_decode_triton(router_logits(x, gate), CFG, None)

        def fused():
            route_decode_fused(x, gate, CFG, None, ticket)

        with torch.no_grad():
            ref = route_decode_triton(router_logits(x, gate), CFG, None)
            got, logits = route_decode_fused(x, gate, CFG, None, ticket)
            row = {"T": T, "unfused": both(unfused), "fused": both(fused),
                   "ids_equal": bool(torch.equal(got.ids_TK, ref.ids_TK)),
                   "logits_max_abs_diff": (logits - router_logits(x, gate)).abs().max().item(),
                   "ticket_after": int(ticket.item())}
        out[T * K] = row
        print(f"logits+route T·K={T * K:5d}: {row}", flush=True)
    return out


GATE_BYTES = (2048, 4096, 8192, 16384)


def kernel_us(fn, name: str, reps: int = 25) -> float:
    """Median device time (the profiler's CUPTI records, not host timing) of the kernels whose
    name contains `name`, over `reps` eager calls of fn, each after an L2 flush: in a decode
    step the gate comes from memory, the other layers' weights having passed through L2."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    times = sorted(e.time_range.elapsed_us() for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and name in e.name)
    return times[len(times) // 2]


def warps_table(tokens: list[int]) -> dict:
    """The fused router's kernel time with decode_route_fused_triton.route_warps at 1, 2, 4, 8
    and _GATE_BYTES_PER_PROGRAM at each of GATE_BYTES (the logits tiles), and the routing
    program alone (route_decode_triton on precomputed logits, its ONE_PROGRAM_WARPS) at each
    warp count."""
    out = {}
    torch.manual_seed(0)
    gate = (torch.randn(E, D, device="cuda") * D ** -0.5).bfloat16()
    ticket = route_tickets("cuda")
    fused_mod = decode_route_fused_triton
    rule = (fused_mod.route_warps, fused_mod._GATE_BYTES_PER_PROGRAM,
            decode_route_triton.ONE_PROGRAM_WARPS)
    try:
        for T in tokens:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                want = route_decode_fused(x, gate, CFG, None, ticket)[0].ids_TK
                logits = router_logits(x, gate)
            row = {"T": T, "rule": [rule[0](T, D, E), rule[1]], "fused": {}, "route_only": {}}
            for warps in (1, 2, 4, 8):
                fused_mod.route_warps = lambda *args, _w=warps, **kw: _w
                decode_route_triton.ONE_PROGRAM_WARPS = warps
                for gate_bytes in GATE_BYTES:
                    fused_mod._GATE_BYTES_PER_PROGRAM = gate_bytes
                    fused_mod.logits_tiles.cache_clear()
                    fused = lambda: route_decode_fused(x, gate, CFG, None, ticket)  # noqa: E731
                    with torch.no_grad():
                        got = fused()[0].ids_TK
                        us = kernel_us(fused, "_decode_route_logits_kernel")
                    row["fused"][f"{warps}/{gate_bytes}"] = {
                        "us": us, "ids_equal": bool(torch.equal(got, want))}
                with torch.no_grad():
                    row["route_only"][warps] = kernel_us(
                        lambda: route_decode_triton(logits, CFG, None), "_decode_route_kernel")
            out[T * K] = row
            print(f"warps T·K={T * K:5d}: {row}", flush=True)
    finally:
        (fused_mod.route_warps, fused_mod._GATE_BYTES_PER_PROGRAM,
         decode_route_triton.ONE_PROGRAM_WARPS) = rule
        fused_mod.logits_tiles.cache_clear()
    return out


def cuda_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


PATHS = (("before", Backends(router="triton")), ("after", Backends(router="triton_decode")),
         ("fused", Backends(router="triton_decode_fused")))


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
        ids = {}
        for label, backends in PATHS:
            set_backends(layer, backends)

            def fwd():
                with torch.no_grad():
                    return layer(x, inference=True)[0]

            with torch.no_grad():
                ids[label] = layer(x, inference=True)[1].ids_TK
            ys[label] = fwd()
            row[label] = both(fwd)
            names = cuda_kernels(fwd)
            row[label]["kernels"] = len(names)
            row[label]["kernel_names"] = names
        row["outputs_equal"] = bool(torch.equal(ys["before"], ys["after"]))
        for label in ("after", "fused"):
            diff = (ys[label].float() - ys["before"].float()).norm() / ys["before"].float().norm()
            row[f"rel_diff_{label}"] = diff.item()
        row["fused_ids_equal_after"] = bool(torch.equal(ids["fused"], ids["after"]))
        out[T] = row
        print(f"layer T={T:3d}: " + ", ".join(
            f"{k}: {v['eager_us']:.1f}/{v['graph_us']:.1f} us, {v['kernels']} kernels"
            for k, v in row.items() if isinstance(v, dict)), flush=True)
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
    lines += ["", "## logits + route + plan from x (µs; unfused = router_logits + "
              "route_decode_triton, fused = route_decode_fused)", "",
              "| T·K | unfused eager | fused eager | unfused graph | fused graph | ids equal | "
              "max abs logit diff |", "|---:|---:|---:|---:|---:|:---:|---:|"]
    for n, row in result["logits_route"].items():
        u, f = row["unfused"], row["fused"]
        lines.append(f"| {n} | {u['eager_us']:.1f} | {f['eager_us']:.1f} | "
                     f"{u['graph_us']:.1f} | {f['graph_us']:.1f} | {row['ids_equal']} | "
                     f"{row['logits_max_abs_diff']:.1e} |")
    lines += ["", "## MoE layer forward (µs eager / graph, kernels per forward; before = "
              "router=triton, after = triton_decode, fused = triton_decode_fused)", "",
              "| T | before | after | fused | after = before | rel diff after | "
              "rel diff fused | fused ids = after |", "|---:|---:|---:|---:|:---:|---:|---:|:---:|"]
    for T, row in result["layer"].items():
        cells = [f"{row[k]['eager_us']:.1f} / {row[k]['graph_us']:.1f}, {row[k]['kernels']}"
                 for k, _ in PATHS]
        lines.append(f"| {T} | " + " | ".join(cells) + f" | {row['outputs_equal']} | "
                     f"{row['rel_diff_after']:.1e} | {row['rel_diff_fused']:.1e} | "
                     f"{row['fused_ids_equal_after']} |")
    if "warps" in result:
        lines += ["", "## fused router kernel time by warps / gate bytes per logits program (µs, "
                  "CUPTI, L2 flushed; * = ids differ from the default's)", "",
                  "| T·K | default | " + " | ".join(f"{w} warps, {b} B" for w in (1, 2, 4, 8)
                                                      for b in GATE_BYTES) + " |",
                  "|---:|---|" + "---:|" * (4 * len(GATE_BYTES))]
        for n, row in result["warps"].items():
            cells = [f"{c['us']:.2f}" + ("" if c["ids_equal"] else " *")
                     for c in row["fused"].values()]
            lines.append(f"| {n} | {row['rule']} | " + " | ".join(cells) + " |")
        lines += ["", "## routing program alone (route_decode_triton on precomputed logits) by "
                  "warps (µs, CUPTI)", "", "| T·K | 1 | 2 | 4 | 8 |", "|---:|---:|---:|---:|---:|"]
        for n, row in result["warps"].items():
            lines.append(f"| {n} | " + " | ".join(f"{row['route_only'][w]:.2f}"
                                                  for w in (1, 2, 4, 8)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--route-tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--layer-tokens", default="1,8,16,64")
    ap.add_argument("--sweep-warps", action="store_true",
                    help="also time the fused router at each warp count (the warps table)")
    ap.add_argument("--only-sweep", action="store_true", help="the warps table alone")
    args = ap.parse_args()
    route_tokens = [int(t) for t in args.route_tokens.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    result = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": " ".join(["python"] + sys.argv),
              "route_plan": {}, "logits_route": {}, "layer": {}}
    if args.sweep_warps or args.only_sweep:
        result["warps"] = warps_table(route_tokens)
    if not args.only_sweep:
        result.update(route_plan=route_plan_table(route_tokens),
                      logits_route=logits_route_table(route_tokens),
                      layer=layer_table([int(t) for t in args.layer_tokens.split(",")]))
    stem = out / f"decode_route_{gpu.replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
