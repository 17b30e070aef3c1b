"""The persistent expert kernels with each expert's last row tile split off, against one launch
and against the GEMM libraries on the same rows.

    PYTHONPATH=. python benchmarks/persistent_split.py OUT.json qwen3:4096 qwen3:2048 ...

Why: at ~256 rows per expert (Qwen3-30B-A3B, 4096 tokens) the down kernel's 128-row tiles
run 2.5 tiles of work per expert for 2 of rows, since half the experts hold a few rows past
their second tile (random routing: 256 +- 16); the up kernel's 64-row tiles 4.5 for 4. A
config with REST (moeflow.ops.persistent_mlp_triton._parts) runs those last, mostly empty
tiles in a second launch on shorter tiles; "overlapped" (OVERLAP) lets that launch's programs
onto the SMs the first one's leave at its tail.

Per cell (shape:tokens), under random top-k routing (benchmarks/prefill_experts.problem) and
under balanced routing (every expert exactly tokens * k / E rows, so no tile is partial where
that is a multiple of the tile): each up config and each down config alone (five calls back to
back, median of 20 CUDA-event timings), its useful TFLOP/s (the rows' FLOPs, not the padded
tiles'), its relative difference from the product config's h / y, and the tile rounds it runs
(tiles per program, summed over its launches). Ceilings on the same rows: torch._grouped_mm
(CUTLASS) on rows already in expert order, and under balanced routing torch.bmm (cuBLAS) on
[E, rows, D] batches: neither gathers nor applies the activation.
"""
import json
import math
import sys

import torch

from machine import cuda_event_ms
from moeflow.ops import persistent_mlp_triton as pm
from prefill_experts import Shape, problem

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}  # D, F, E, top-k


def _blocks(m, n, rest=None, overlap=False):
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, **({"REST": rest} if rest else {}),
            **({"OVERLAP": True} if overlap else {})}


def _launch(warps, stages):
    return {"num_warps": warps, "num_stages": stages}


# (name, blocks, launch, warp-specialised). Tiles under 64 rows run without warp
# specialisation (persistent_mlp_triton._parts); SwiGLU's 64 x 256 up tiles fit 3 stages, not 4.
UP = [("product 64x256", _blocks(64, 256), _launch(8, 3), True),
      ("64x256 + rest 32x256", _blocks(64, 256, (_blocks(32, 256), _launch(4, 3))),
       _launch(8, 3), True),
      ("64x256 + rest 32x256, overlapped", _blocks(64, 256, (_blocks(32, 256), _launch(4, 3)),
                                                   True), _launch(8, 3), True),
      ("128x128", _blocks(128, 128), _launch(8, 4), True),
      ("128x128 + rest 64x256", _blocks(128, 128, (_blocks(64, 256), _launch(8, 3))),
       _launch(8, 4), True),
      ("128x128 + rest 32x128", _blocks(128, 128, (_blocks(32, 128), _launch(4, 4))),
       _launch(8, 4), True),
      ("128x128 TMA-stored", dict(_blocks(128, 128), STORE_SPLIT=2), _launch(8, 4), True),
      ("128x128 TMA-stored + rest 64x256, overlapped",
       dict(_blocks(128, 128, (_blocks(64, 256), _launch(8, 3)), True), STORE_SPLIT=2),
       _launch(8, 4), True)]
DOWN = [("product 128x256", _blocks(128, 256), _launch(8, 4), True),
        ("128x256 + rest 64x256", _blocks(128, 256, (_blocks(64, 256), _launch(8, 4))),
         _launch(8, 4), True),
        ("128x256 + rest 32x256", _blocks(128, 256, (_blocks(32, 256), _launch(4, 4))),
         _launch(8, 4), True),
        ("128x256 + rest 32x256, overlapped",
         _blocks(128, 256, (_blocks(32, 256), _launch(4, 4)), True), _launch(8, 4), True),
        ("128x256 + rest 64x256, overlapped",
         _blocks(128, 256, (_blocks(64, 256), _launch(8, 4)), True), _launch(8, 4), True),
        ("128x256 + rest 16x256", _blocks(128, 256, (_blocks(16, 256), _launch(4, 4))),
         _launch(8, 4), True)]


def balanced(sh: Shape, device):
    """problem()'s tensors with token t routed to experts (t*k + j) % E, j < k: every expert
    gets tokens * k / E rows, from tokens spread over the matrix."""
    x, _, _, weights = problem(sh, torch.bfloat16, device)
    ids_TK = (torch.arange(sh.tokens)[:, None] * sh.top_k + torch.arange(sh.top_k)) % sh.E
    order = ids_TK.reshape(-1).argsort(stable=True)
    ends = torch.bincount(ids_TK.reshape(-1), minlength=sh.E).cumsum(0)
    return x, (order // sh.top_k).to(device), ends.to(device), weights


def _rounds(ends: torch.Tensor, blocks: dict, cols, programs: int) -> int:
    """Tile rounds of a config's launches: each launch's tiles over the programs, rounded up
    (cols(blocks): a launch's column tiles)."""
    rows = ends.diff(prepend=ends.new_zeros(1)).tolist()
    m, rest = blocks["BLOCK_M"], blocks.get("REST")
    if rest is None:
        return math.ceil(sum(-(-r // m) for r in rows) * cols(blocks) / programs)
    rm = rest[0]["BLOCK_M"]
    main = [r // m + (r % m > rm) for r in rows]
    left = [max(r - k * m, 0) for r, k in zip(rows, main)]
    return (math.ceil(sum(main) * cols(blocks) / programs)
            + math.ceil(sum(-(-r // rm) for r in left) * cols(rest[0]) / programs))


def _timed(fn) -> float:
    return cuda_event_ms(lambda: [fn() for _ in range(5)], 20, warmup=2) / 5


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
    rec = {"cell": cell, "routing": routing, "rows": N, "rows_per_expert_min_max":
           [int(counts.min()), int(counts.max())]}
    up_flops, down_flops = 2 * N * D * 2 * F, 2 * N * F * D
    h0 = torch.empty(N, F, dtype=x.dtype, device=dev)
    y0 = torch.empty(N, D, dtype=x.dtype, device=dev)

    def up(cfg, h):
        _, blocks, launch, ws = cfg
        pm.launch_up(x, rows_N, ends, w_in, None, h, True, sms, ws, blocks, launch)
        return h

    def down(cfg, y):
        _, blocks, launch, ws = cfg
        pm.launch_down(h0, ends, w_out, None, y, sms, ws, blocks, launch)
        return y

    up(UP[0], h0)
    down(DOWN[0], y0)
    for key, configs, run, ref, flops, cols in (
            ("up", UP, up, h0, up_flops, lambda b: -(-F // b["BLOCK_N"])),
            ("down", DOWN, down, y0, down_flops, lambda b: -(-D // b["BLOCK_N"]))):
        rec[key] = []
        for cfg in configs:
            row = {"config": cfg[0], "rounds": _rounds(ends, cfg[1], cols, sms)}
            try:
                out = run(cfg, torch.empty_like(ref))
                row["ms"] = _timed(lambda cfg=cfg, out=out: run(cfg, out))
                row["tflops"] = flops / row["ms"] / 1e9
                row["rel_diff"] = _rel(out, ref)
            except Exception as exc:  # noqa: BLE001  (a config that does not build is a result)
                row["error"] = str(exc)[:300]
            rec[key].append(row)
            print(cell, routing, key, row, flush=True)
    xs = x[rows_N]
    offs = ends.to(torch.int32)
    rec["grouped_mm"] = {
        "up_ms": _timed(lambda: torch._grouped_mm(xs, w_in, offs=offs)),
        "down_ms": _timed(lambda: torch._grouped_mm(h0, w_out, offs=offs))}
    if routing == "balanced":
        xb, hb = xs.view(E, N // E, D), h0.view(E, N // E, F)
        rec["bmm"] = {"up_ms": _timed(lambda: torch.bmm(xb, w_in)),
                      "down_ms": _timed(lambda: torch.bmm(hb, w_out))}
    for lib in ("grouped_mm", "bmm"):
        if lib in rec:
            rec[lib]["up_tflops"] = up_flops / rec[lib]["up_ms"] / 1e9
            rec[lib]["down_tflops"] = down_flops / rec[lib]["down_ms"] / 1e9
            print(cell, routing, lib, rec[lib], flush=True)
    return rec


def markdown(results: list[dict], gpu: str) -> str:
    out = [f"# Persistent experts, the last row tile split off ({gpu})", "",
           "ms per call (five back to back, median of 20); useful TFLOP/s; tile rounds "
           "(tiles per program summed over launches); relative difference from the product "
           "config.", ""]
    for r in results:
        lo, hi = r["rows_per_expert_min_max"]
        out += [f"## {r['cell']}, {r['routing']} routing ({lo}-{hi} rows per expert)", "",
                "| kernel | config | ms | TFLOP/s | rounds | rel diff |", "|" + "---|" * 6]
        for key in ("up", "down"):
            for row in r[key]:
                if "error" in row:
                    out.append(f"| {key} | {row['config']} | error: {row['error'][:80]} | | | |")
                else:
                    out.append(f"| {key} | {row['config']} | {row['ms']:.3f} | "
                               f"{row['tflops']:.0f} | {row['rounds']} | {row['rel_diff']:.1e} |")
        for lib in ("grouped_mm", "bmm"):
            if lib in r:
                g = r[lib]
                out.append(f"| up / down | torch.{'_grouped_mm' if lib == 'grouped_mm' else 'bmm'}"
                           f" | {g['up_ms']:.3f} / {g['down_ms']:.3f} | {g['up_tflops']:.0f} / "
                           f"{g['down_tflops']:.0f} | | |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) < 3 or not torch.cuda.is_available():
        raise SystemExit("usage (on a Hopper GPU): persistent_split.py OUT.json "
                         "qwen3:TOKENS|mixtral:TOKENS ...")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for cell in sys.argv[2:]:
        for routing in ("random", "balanced"):
            results.append(measure(cell, routing, sms))
            with open(sys.argv[1], "w") as f:
                json.dump(results, f, indent=1)
    with open(sys.argv[1].removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(results, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
