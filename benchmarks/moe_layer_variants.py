"""The MoE layer forward under variants of the persistent experts' rule and tiles, in one
process: benchmarks/moe_layer.py's layers and timing (eager, CUDA events), each variant set by
replacing moeflow.ops.backend.PERSISTENT_MIN_ROWS_PER_EXPERT and
moeflow.ops.persistent_mlp_triton._configs, two rounds in opposite orders (the eager cells of
this host move by up to 2x between calls, so one round proves little).

    PYTHONPATH=. python benchmarks/moe_layer_variants.py OUT.json

Variants: `session25` (128 x 128 up / 128 x 256 down tiles, persistent above 128 rows per
expert), `up64-all` (64 x 256 up tiles for every activation, 64-row down tiles for F > 2048,
persistent above 64 rows), `product` (moeflow's: GELU's up on 128 x 256, 128 x 128 above 512
rows per expert) and `product-above128` (the same tiles, persistent above 128 rows).
Results (H200, session 26): benchmarks/results/moe_layer/README.md.
"""
import json
import sys

import torch

import moe_layer as ml
from moeflow.ops import backend
from moeflow.ops import persistent_mlp_triton as pm

L3, L4 = {"num_warps": 8, "num_stages": 3}, {"num_warps": 8, "num_stages": 4}


def _session25(ws, F, rows, swiglu):
    return ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, L3,
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, L4)


def _up64_all(ws, F, rows, swiglu):
    return ({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, L3,
            {"BLOCK_M": 64 if F > 2048 else 128, "BLOCK_N": 256, "BLOCK_K": 64}, L4)


VARIANTS = {"session25": (128, _session25), "up64-all": (64, _up64_all),
            "product": (64, pm._configs), "product-above128": (128, pm._configs)}
CELLS = [("ds-1.3b+moe128", 16384), ("qwen3-30b-a3b", 2048), ("qwen3-30b-a3b", 4096),
         ("qwen3-30b-a3b", 16384), ("mixtral-8x7b", 1024), ("mixtral-8x7b", 2048)]


def main() -> None:
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        raise SystemExit("usage (on a Hopper GPU): moe_layer_variants.py OUT.json")
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in dict.fromkeys(s for s, _ in CELLS):
        fn, _ = ml.build("moeflow", shape)
        D = ml.SHAPES[shape][0]
        for rnd in range(2):
            for name in (list(VARIANTS) if rnd == 0 else list(reversed(VARIANTS))):
                backend.PERSISTENT_MIN_ROWS_PER_EXPERT, pm._configs = VARIANTS[name]
                for T in (t for s, t in CELLS if s == shape):
                    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)

                    def step(x=x):
                        with torch.no_grad():
                            fn(x)
                    step()
                    ms = ml.time_fn(step)
                    out.setdefault(f"{shape}:{T}", {}).setdefault(name, []).append(ms)
                    print(shape, T, name, rnd, f"{ms:.3f}", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    for cell, runs in out.items():
        print(cell, "  ".join(f"{k} {min(v):.3f}/{max(v):.3f}" for k, v in runs.items()))


if __name__ == "__main__":
    main()
