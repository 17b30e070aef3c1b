"""Expert GEMM ceilings: the persistent expert kernels against the GEMM libraries.

On the same rows, under random routing and under perfectly balanced routing: how much the
padded last row tile of each expert costs, and how fast a GEMM of this size can run.

    PYTHONPATH=. python benchmarks/expert_gemm_ceiling.py OUT.json [qwen3:4096 qwen3:2048 ...]

Why: issue 14's forward at 4096 tokens of the Qwen3-30B-A3B shape (~256 rows per expert) is
1.84x its floor (H200, session 36), the two expert kernels ~90% of it. Under random routing (here
benchmarks/prefill_experts.problem: 207-299 rows per expert at 4096 tokens) the kernels' row
tiles pad each expert's last tile; under balanced routing (token t to experts (t*k + j) % E:
every expert tokens * k / E rows, a whole number of tiles) nothing is padded, and cuBLAS can
run the experts as one batched GEMM.

Per cell (shape:tokens) and routing: the product's up and down configs
(moeflow.ops.persistent_mlp_triton._configs), the up kernel on 128 x 128 tiles stored through
TMA, and the up kernel on rows already in expert order (no gather; its loads are the same
pointer loads), each alone; torch._grouped_mm (CUTLASS) on rows in expert order; under balanced
routing torch.bmm (cuBLAS) on [E, rows, D] batches. Libraries neither gather nor apply the
activation. Each timed as five calls back to back (median of 20 CUDA-event timings), with its
useful TFLOP/s (the rows' FLOPs) and the kernels' relative difference from the product's h / y.
"""
import argparse
import json

import torch

from moeflow.ops import persistent_mlp_triton as pm
from persistent_configs import SHAPES, timed_back_to_back
from prefill_experts import Shape, problem


def balanced(sh: Shape, device):
    """problem()'s tensors with token t routed to experts (t*k + j) % E, j < k: every expert
    gets tokens * k / E rows, from tokens spread over the matrix."""
    x, _, _, weights = problem(sh, torch.bfloat16, device)
    ids_TK = (torch.arange(sh.tokens)[:, None] * sh.top_k + torch.arange(sh.top_k)) % sh.E
    order = ids_TK.reshape(-1).argsort(stable=True)
    ends = torch.bincount(ids_TK.reshape(-1), minlength=sh.E).cumsum(0)
    return x, (order // sh.top_k).to(device), ends.to(device), weights


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(cell: str, routing: str, sms: int) -> dict:
    name, tokens = cell.split(":")
    D, F, E, K = SHAPES[name]
    sh = Shape(cell, int(tokens), D, F, E, K, "swiglu")
    dev = torch.device("cuda")
    x, rows_N, ends, (w_in, w_out) = (problem(sh, torch.bfloat16, dev) if routing == "random"
                                      else balanced(sh, dev))
    N = rows_N.shape[0]
    counts = ends.diff(prepend=ends.new_zeros(1))
    rec = {"cell": cell, "routing": routing, "rows": N,
           "rows_per_expert_min_max": [int(counts.min()), int(counts.max())]}
    up_cfg, up_launch, down_cfg, down_launch = pm._configs(True, F, N / E, True)
    xs = x[rows_N]  # the rows in expert order

    def up(blocks, launch, h, gathered=True):
        pm.launch_up(x if gathered else xs, rows_N if gathered else None, ends, w_in, None, h,
                     True, sms, True, blocks, launch)
        return h

    def down(blocks, launch, y, h):
        pm.launch_down(h, ends, w_out, None, y, sms, True, blocks, launch)
        return y

    h0 = up(up_cfg, up_launch, torch.empty(N, F, dtype=x.dtype, device=dev))
    y0 = down(down_cfg, down_launch, torch.empty(N, D, dtype=x.dtype, device=dev), h0)
    wide = dict(pm._WIDE, STORE_SPLIT=2), {"num_warps": 8, "num_stages": 4}
    up_flops, down_flops = 2 * N * D * 2 * F, 2 * N * F * D  # SwiGLU's up: gate and up columns
    runs = {
        "up, product": (lambda h: up(up_cfg, up_launch, h), h0, up_flops),
        "up, 128x128 TMA-stored": (lambda h: up(*wide, h), h0, up_flops),
        "up, product, rows in expert order": (lambda h: up(up_cfg, up_launch, h, False), h0,
                                              up_flops),
        "down, product": (lambda y: down(down_cfg, down_launch, y, h0), y0, down_flops)}
    rec["kernels"] = {}
    for label, (run, ref, flops) in runs.items():
        out = run(torch.empty_like(ref))
        ms = timed_back_to_back(lambda run=run, out=out: run(out))
        rec["kernels"][label] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_diff": _rel(out, ref)}
        print(cell, routing, label, rec["kernels"][label], flush=True)
    offs = ends.to(torch.int32)
    libs = {"torch._grouped_mm": (lambda: torch._grouped_mm(xs, w_in, offs=offs),
                                  lambda: torch._grouped_mm(h0, w_out, offs=offs))}
    if routing == "balanced":
        xb, hb = xs.view(E, N // E, D), h0.view(E, N // E, F)
        libs["torch.bmm"] = (lambda: torch.bmm(xb, w_in), lambda: torch.bmm(hb, w_out))
    rec["libraries"] = {}
    for lib, (lib_up, lib_down) in libs.items():
        up_ms, down_ms = timed_back_to_back(lib_up), timed_back_to_back(lib_down)
        rec["libraries"][lib] = {"up_ms": up_ms, "down_ms": down_ms,
                                 "up_tflops": up_flops / up_ms / 1e9,
                                 "down_tflops": down_flops / down_ms / 1e9}
        print(cell, routing, lib, rec["libraries"][lib], flush=True)
    return rec


def markdown(results: list[dict], gpu: str) -> str:
    out = [f"# Expert GEMMs: the persistent kernels against the libraries ({gpu})", "",
           "ms per call (five back to back, median of 20), useful TFLOP/s, relative difference "
           "from the product's output.", "",
           "| cell | routing (rows per expert) | GEMM | ms | TFLOP/s | rel diff |",
           "|" + "---|" * 6]
    for r in results:
        lo, hi = r["rows_per_expert_min_max"]
        head = f"| {r['cell']} | {r['routing']} ({lo}-{hi}) "
        for label, k in r["kernels"].items():
            out.append(head + f"| {label} | {k['ms']:.3f} | {k['tflops']:.0f} | "
                       f"{k['rel_diff']:.1e} |")
        for lib, g in r["libraries"].items():
            out.append(head + f"| up, {lib} | {g['up_ms']:.3f} | {g['up_tflops']:.0f} | |")
            out.append(head + f"| down, {lib} | {g['down_ms']:.3f} | {g['down_tflops']:.0f} | |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON path (the markdown table beside it)")
    ap.add_argument("cells", nargs="*", default=["qwen3:4096", "qwen3:2048", "qwen3:16384"],
                    help=f"shape:tokens, shape one of {sorted(SHAPES)}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("expert_gemm_ceiling.py needs a Hopper GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = [measure(cell, routing, sms) for cell in args.cells
               for routing in ("random", "balanced")]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(results, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
