"""The persistent expert kernels' launch configs, each kernel alone, against the product paths.

    PYTHONPATH=. python benchmarks/persistent_configs.py OUT.json qwen3:1024 mixtral:2048 ...

Per cell (shape:tokens; random top-k routing, bf16, SwiGLU): the whole expert MLP through the
"tiled", "persistent" and "grouped_mm_fused" backends, then moeflow.ops.persistent_mlp_triton's
up kernel and down kernel alone under each config of UP / DOWN (tile shape, warps, stages,
warp specialisation, programs per SM), each timed as five calls back to back (median of 20),
with its weight bytes per second; every up config's h is checked bit for bit against the
first config's, every down config's y against the first's (relative difference). Configs that
do not build (shared memory, Triton's warp-specialisation pass) are recorded with their error.
Results (H200, session 26): benchmarks/results/prefill_experts/README.md.
"""
import json
import sys

import torch

from machine import cuda_event_ms
from moeflow.ops import persistent_mlp_triton as pm
from moeflow.ops.backend import EXPERT_BACKENDS
from prefill_experts import Shape, problem

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}  # D, F, E, top-k


def _config(m, n, k, warps, stages, ws, per_sm=1, store=0):
    """store: STORE_SPLIT (0 pointer stores; 1 or 2: whole row tiles through TMA in that many
    column pieces)."""
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "STORE_SPLIT": store}, {
        "num_warps": warps, "num_stages": stages}, ws, per_sm


# Session 31: the product's tiles against the same tiles storing through TMA (shared memory
# for the staged output tile leaves 2-4 stages; tests/_compile_sm90.py sizes). Session 42: two
# more 64-row down tiles, for the padded last row tile of each expert at ~256 rows per expert.
UP = [_config(128, 128, 64, 8, 3, True), _config(128, 128, 64, 8, 3, True, store=1),
      _config(128, 128, 64, 8, 4, True, store=2), _config(128, 128, 64, 8, 3, True, store=2),
      _config(64, 256, 64, 8, 3, True), _config(64, 256, 64, 8, 2, True),
      _config(64, 256, 64, 8, 2, True, store=2)]
DOWN = [_config(128, 256, 64, 8, 4, True), _config(128, 256, 64, 8, 4, True, store=2),
        _config(128, 256, 64, 8, 3, True, store=1), _config(128, 256, 64, 8, 3, True, store=2),
        _config(64, 256, 64, 8, 4, True), _config(64, 256, 64, 8, 4, True, store=2),
        _config(64, 256, 64, 8, 5, True), _config(64, 128, 64, 8, 5, True)]


def timed_back_to_back(fn):
    """ms per call of fn, five calls back to back between the events (median of 20)."""
    return cuda_event_ms(lambda: [fn() for _ in range(5)], 20, warmup=2) / 5


def _sweep(configs, run, nbytes, check):
    rows = []
    for cfg in configs:
        try:
            out = run(cfg)
            rows.append({"config": repr(cfg), "ms": timed_back_to_back(lambda: run(cfg)),
                         "check": check(out)})
            rows[-1]["TBps"] = nbytes / rows[-1]["ms"] / 1e9
        except Exception as exc:  # noqa: BLE001  (a config that does not build is a result)
            rows.append({"config": repr(cfg), "error": str(exc)[:200]})
        print(rows[-1], flush=True)
    return rows


def measure(cell: str, sms: int) -> dict:
    name, tokens = cell.split(":")
    D, F, E, K = SHAPES[name]
    x, rows_N, ends, (w_in, w_out) = problem(Shape(cell, int(tokens), D, F, E, K, "swiglu"),
                                             torch.bfloat16, torch.device("cuda"))
    N = rows_N.shape[0]
    kept = int(ends[-1])
    rec = {"cell": cell, "rows_per_expert": N / E}
    for path in ("tiled", "persistent", "grouped_mm_fused"):
        fn = EXPERT_BACKENDS[path]
        rec[path] = timed_back_to_back(lambda fn=fn: fn(x, ends, w_in, None, w_out, None,
                                                        "swiglu", False, rows_N=rows_N))

    def run_up(cfg, h=None):
        blocks, launch, ws, per_sm = cfg
        h = torch.empty(N, F, dtype=x.dtype, device=x.device) if h is None else h
        pm.launch_up(x, rows_N, ends, w_in, None, h, True, sms * per_sm, ws, blocks, launch)
        return h

    def run_down(cfg, h):
        blocks, launch, ws, per_sm = cfg
        y = torch.empty(N, D, dtype=x.dtype, device=x.device)
        pm.launch_down(h, ends, w_out, None, y, sms * per_sm, ws, blocks, launch)
        return y

    h0 = run_up(UP[0])
    y0 = run_down(DOWN[0], h0)

    rec["up"] = _sweep(UP, run_up, w_in.numel() * 2,
                       lambda h: bool(torch.equal(h[:kept], h0[:kept])))
    rec["down"] = _sweep(DOWN, lambda cfg: run_down(cfg, h0), w_out.numel() * 2, lambda y: float(
        (y[:kept].float() - y0[:kept].float()).norm() / y0[:kept].float().norm()))
    print(cell, {p: round(rec[p], 3) for p in ("tiled", "persistent", "grouped_mm_fused")},
          flush=True)
    return rec


def main() -> None:
    if len(sys.argv) < 3 or not torch.cuda.is_available():
        raise SystemExit("usage (on a Hopper GPU): persistent_configs.py OUT.json "
                         "qwen3:TOKENS|mixtral:TOKENS ...")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for cell in sys.argv[2:]:
        results.append(measure(cell, sms))
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
