"""The MoE layer forward under variants of the persistent experts' rule and tiles, in one
process: benchmarks/moe_layer.py's layers and timing (eager, CUDA events), each variant set by
replacing moeflow.ops.backend.PERSISTENT_MIN_ROWS_PER_EXPERT and
moeflow.ops.persistent_mlp_triton._configs, two rounds in opposite orders (the eager cells of
this host move by up to 2x between calls, so one round proves little).

    PYTHONPATH=. python benchmarks/moe_layer_variants.py OUT.json [--variants NAME ...]
        [--cells SHAPE:T ...]

Variants: `session25` (128 x 128 up / 128 x 256 down tiles, persistent above 128 rows per
expert), `up64-all` (64 x 256 up tiles for every activation, 64-row down tiles for F > 2048,
persistent above 64 rows), `product` (moeflow's: GELU's up on 128 x 256, 128 x 128 above 512
rows per expert), `product-above128` (the same tiles, persistent above 128 rows), and
(session 42) `wide-from-256` / `wide4-from-256`: SwiGLU's up on the long path's 128 x 128
tiles stored whole through TMA from 256 rows per expert, on its 3 stages / on 4 (at any row
count from 256).
Results: benchmarks/results/moe_layer/README.md (H200, session 26; H100, session 42).
"""
import argparse
import json

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


_PRODUCT = pm._configs  # the variants below replace the module's


def _wide_from_256(stages):
    def configs(ws, F, rows, swiglu):
        up, up_launch, down, down_launch = _PRODUCT(ws, F, rows, swiglu)
        if ws and swiglu and rows >= 256:
            up, up_launch = dict(pm._WIDE, STORE_SPLIT=2), {"num_warps": 8, "num_stages": stages}
        return up, up_launch, down, down_launch
    return configs


VARIANTS = {"session25": (128, _session25), "up64-all": (64, _up64_all),
            "product": (64, _PRODUCT), "product-above128": (128, _PRODUCT),
            "wide-from-256": (64, _wide_from_256(3)), "wide4-from-256": (64, _wide_from_256(4))}
CELLS = [("ds-1.3b+moe128", 16384), ("qwen3-30b-a3b", 2048), ("qwen3-30b-a3b", 4096),
         ("qwen3-30b-a3b", 16384), ("mixtral-8x7b", 1024), ("mixtral-8x7b", 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--cells", nargs="+", default=[f"{s}:{t}" for s, t in CELLS])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_layer_variants.py needs a Hopper GPU")
    variants = {name: VARIANTS[name] for name in args.variants}
    cells = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.cells]
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in dict.fromkeys(s for s, _ in cells):
        fn, _ = ml.build("moeflow", shape)
        D = ml.SHAPES[shape][0]
        for rnd in range(2):
            for name in (list(variants) if rnd == 0 else list(reversed(variants))):
                backend.PERSISTENT_MIN_ROWS_PER_EXPERT, pm._configs = variants[name]
                for T in (t for s, t in cells if s == shape):
                    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)

                    def step(x=x):
                        with torch.no_grad():
                            fn(x)
                    step()
                    ms = ml.time_fn(step)
                    out.setdefault(f"{shape}:{T}", {}).setdefault(name, []).append(ms)
                    print(shape, T, name, rnd, f"{ms:.3f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for cell, runs in out.items():
        print(cell, "  ".join(f"{k} {min(v):.3f}/{max(v):.3f}" for k, v in runs.items()))


if __name__ == "__main__":
    main()
