"""The CPU side of a split miss (cpu_experts="split", moeflow.infer.offload.split_experts),
measured without a GPU: the two assumptions the share rule rests on.

1. The CPU share's time is proportional to its columns (f · cpu_s): one expert of the given
   shape (default Mixtral's: d 4096, d_ff 14336, SwiGLU, bf16, 352 MB) computed for 1 row on
   the split's worker thread with the CPU taking f of the columns, f = 0.25 .. 1.
2. The worker thread really runs beside the main thread: while it computes a share, the main
   thread runs a loop of small torch ops (a stand-in for queuing a layer's device work:
   Python + dispatcher, GIL held between ops). Reported: each alone and both at once; if
   torch's CPU kernels did not release the GIL, "together" would be near the sum.

Run (any machine; on the GPU host it measures the host that serves the offloaded model):
    PYTHONPATH=. python benchmarks/offload_split_cpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moeflow.infer.offload.cpu_experts import CpuExpertCosts
from moeflow.infer.offload.expert_store import ExpertStore
from moeflow.infer.offload.split_experts import SplitExperts


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=14336)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--launch-ops", type=int, default=2000,
                   help="small torch ops in the main thread's stand-in loop")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    D, F = args.d_model, args.d_ff
    store = ExpertStore(pin=False)
    store.add_layer(torch.randn(1, D, 2 * F, dtype=torch.bfloat16) * 0.02,
                    torch.randn(1, F, D, dtype=torch.bfloat16) * 0.02, None, None)
    split = SplitExperts(store, "swiglu", CpuExpertCosts(1.0, 1.0, 0.0), torch.device("cpu"),
                         None)
    x_1D = torch.randn(1, D, dtype=torch.bfloat16)
    out: dict = {"d_model": D, "d_ff": F, "threads": torch.get_num_threads(),
                 "expert_MB": 3 * D * F * 2 / 1e6, "share_ms": {}}

    def share(f: float):
        Fg = F - int(round(f * F))
        return lambda: split.start_cpu(0, [(0, Fg, x_1D)]).result()
    for f in (0.25, 0.39, 0.5, 0.75, 1.0):
        out["share_ms"][f] = median_ms(share(f), args.repeats)
    full = out["share_ms"][1.0]
    out["share_over_f_times_full"] = {f: ms / (f * full) for f, ms in out["share_ms"].items()}

    small = torch.randn(8, 8)

    def launch_loop():
        y = small
        for _ in range(args.launch_ops):
            y = (y + 1.0) * 0.5
        return y
    out["main_loop_alone_ms"] = median_ms(launch_loop, args.repeats)
    out["worker_share_0.39_alone_ms"] = out["share_ms"][0.39]
    Fg = F - int(round(0.39 * F))

    def together():
        pending = split.start_cpu(0, [(0, Fg, x_1D)])
        launch_loop()
        pending.result()
    out["together_ms"] = median_ms(together, args.repeats)
    out["sum_alone_ms"] = out["main_loop_alone_ms"] + out["worker_share_0.39_alone_ms"]
    out["machine"] = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "offload_split_cpu.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
