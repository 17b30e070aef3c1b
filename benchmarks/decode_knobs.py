"""Launch settings of the decode kernels, forced one variant at a time inside the served decode
graph: which tiles and warps make the step fastest where it runs, not where a kernel alone is
timed (autotuning the kernel alone picked configs that lost 1-5 µs per layer in the graph).

Each variant is a ';'-separated list of settings (an empty one: the product as it is):

    gemv=N,K:BN,BK,W      the one-row GEMV of weight [N, K] (skinny_linear_triton.gemv_config)
    rw=W                  the decode router's warps at every T
                          (decode_route_fused_triton.route_warps)
    gate=BYTES            gate bytes per router logits program (_GATE_BYTES_PER_PROGRAM)
    moe=UN,UK,DN,DK,W,S[,P]  the experts' one launch, every call (grouped_mlp_triton's
                          _moe_stream_kernel: up and down tiles, warps, stages, and the
                          w_out rows a down program loads before it waits, PRE_K; 0 if left out)

Per variant and batch size: a fresh engine's decode graph (benchmarks/decode_timeline.measure),
its replay time and the layer period with each kernel's end step. Variants run in the order
given, so list each twice (forward, then reversed) to see the drift between repeats.

    PYTHONPATH=. python benchmarks/decode_knobs.py --out DIR --batches 1 16 \\
        --variant "" --variant "rw=4" --variant "gemv=5120,2048:2,1024,4" ...

Writes DIR/decode_knobs.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_timeline import measure  # noqa: E402
from generate import PROMPT, build  # noqa: E402

import moeflow.ops.decode_route_fused_triton as route  # noqa: E402
import moeflow.ops.grouped_mlp_triton as experts  # noqa: E402
import moeflow.ops.skinny_linear_triton as skinny  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


@contextmanager
def forced(spec: str):
    """The settings of one variant, undone on exit."""
    saved = (skinny.gemv_config, route.route_warps, route._GATE_BYTES_PER_PROGRAM,
             experts.FEW_ACTIVE_EXPERTS, experts.FEW_ACTIVE_CONFIG)
    gemv = {}
    try:
        for item in filter(None, spec.split(";")):
            key, _, value = item.partition("=")
            if key == "gemv":
                shape, _, config = value.partition(":")
                bn, bk, warps = _ints(config)
                gemv[tuple(_ints(shape))] = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
            elif key == "rw":
                route.route_warps = lambda *a, _w=int(value), **k: _w
            elif key == "gate":
                route._GATE_BYTES_PER_PROGRAM = int(value)
                route.logits_tiles.cache_clear()
            elif key == "moe":
                un, uk, dn, dk, warps, stages, *pre = _ints(value)
                experts.FEW_ACTIVE_EXPERTS = 1 << 30  # every call takes the forced config
                experts.FEW_ACTIVE_CONFIG = {"UP_N": un, "UP_K": uk, "DOWN_N": dn,
                                             "DOWN_K": dk, "PRE_K": pre[0] if pre else 0,
                                             "num_warps": warps,
                                             "num_stages": stages}
            else:
                raise SystemExit(f"decode_knobs: unknown setting {key!r} in {spec!r}")
        if gemv:
            product = saved[0]
            skinny.gemv_config = lambda N, K: gemv.get((N, K)) or product(N, K)
        yield
    finally:
        (skinny.gemv_config, route.route_warps, route._GATE_BYTES_PER_PROGRAM,
         experts.FEW_ACTIVE_EXPERTS, experts.FEW_ACTIVE_CONFIG) = saved
        route.logits_tiles.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--variant", action="append", default=None,
                    help="';'-separated settings (repeatable; '' is the product)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--prompts", type=int, nargs="+", default=[PROMPT],
                    help="prompt lengths (the keys each step attends to)")
    args = ap.parse_args()
    variants = args.variant if args.variant is not None else [""]
    for spec in variants:  # a typo fails here, before the model is built
        with forced(spec):
            pass
    model = build(args.model)
    res = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__, "model": args.model,
           "command": "python " + " ".join(sys.argv), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        for prompt in args.prompts:
            measure(model, batch, args.max_seq_len, prompt)  # compiles and autotunes first
            for spec in variants:
                with forced(spec):
                    r = measure(model, batch, args.max_seq_len, prompt)
                path = r["replay"]["layer_path"]
                res["runs"].append({"variant": spec, "batch": batch, "prompt": prompt,
                                    "replay_ms": r["graph_replay_ms"],
                                    "period_us": path["period_us"], "rows": path["rows"]})
                steps = " ".join(f"{row[3]}" for row in path["rows"])
                print(f"[{spec}] b{batch} prompt {prompt}: replay {r['graph_replay_ms']:.3f} ms, "
                      f"period {path['period_us']} µs, end steps {steps}", flush=True)
            (out / "decode_knobs.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
