"""One MoE layer, timed against the hardware floor and against peer implementations, in one run.

    PYTHONPATH=. python benchmarks/moe_layer.py                       # everything (one GPU)
    PYTHONPATH=. python benchmarks/moe_layer.py --shapes qwen3-30b-a3b --tokens 8 4096

First measures the GPU's copy bandwidth (device-to-device copy, bytes read + written) and bf16
GEMM rate (8192³ matmul), then for each shape (d, f, E, k) and token count T, forward (no grad)
and forward+backward (input and all weight gradients), bf16:
  floor = max(bytes / bandwidth, FLOPs / rate)
  forward:  FLOPs = 2·T·k·D·(I+F) + 2·T·D·E (router) + shared expert; bytes = weights of the
            experts this input actually hits + router + shared weights + x in and y out.
  fwd+bwd:  3× the forward FLOPs; weights read twice and their gradients written once (3× weight
            bytes) plus 3× the activation bytes.
Implementations: moeflow (backend "auto": the fast paths), moeflow-ref (all plain-torch
references), DeepSpeed `deepspeed.moe.layer.MoE` (capacity factor 1.0, one process group of one
rank), transformers `MixtralSparseMoeBlock` with experts_implementation "eager" and
"grouped_mm". Peers get the DeepSeek shared expert as the same dense torch MLP added to their
output. Times: median of many CUDA-event-timed runs after warm-up. Writes JSON and a markdown
table (GPU name, date, command) into --out; a cell that cannot run says why instead of a time.

Routing per shape follows the model each shape comes from: Mixtral and Qwen3 softmax top-k with
renormalised weights, dropless; ds-1.3b+moe128 top-1 with capacity factor 1.0 (DeepSpeed-MoE);
DeepSeek-V3 sigmoid scores, 8 groups / top-4 groups, expert bias, scaling 2.5, dropless.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
from torch import nn

from moeflow.config import FFNSpec, RouterConfig
from moeflow.model.moe import MoELayer

SHAPES = {  # name: (D, F, E, k, activation, shared experts, router)
    "mixtral-8x7b": (4096, 14336, 8, 2, "swiglu", 0,
                     RouterConfig(top_k=2, normalize_topk=True, dropless=True)),
    "ds-1.3b+moe128": (2048, 8192, 128, 1, "gelu", 0,
                       RouterConfig(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "swiglu", 0,
                      RouterConfig(top_k=8, normalize_topk=True, dropless=True)),
    "deepseek-v3": (7168, 2048, 256, 8, "swiglu", 1,
                    RouterConfig(top_k=8, score_func="sigmoid", normalize_topk=True,
                                 routed_scaling=2.5, num_groups=8, topk_groups=4,
                                 expert_bias=True, dropless=True)),
}
IMPLS = ("moeflow", "moeflow-ref", "deepspeed", "hf-eager", "hf-grouped_mm")
GPU_BYTES = None  # filled in main from the device


class DenseMLP(nn.Module):
    """The expert / shared-expert MLP for the peers (SwiGLU or GELU), bias-free."""

    def __init__(self, d: int, f: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d, 2 * f if activation == "swiglu" else f, bias=False)
        self.w_out = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.w_in(x)
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            h = nn.functional.silu(g) * u
        else:
            h = nn.functional.gelu(h)
        return self.w_out(h)


def measure_bandwidth() -> float:
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), budget_s=0.5)
    del src, dst
    return 2 * 2 * 1024**3 / (ms * 1e-3)  # bytes read + written per second


def measure_gemm_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ b, budget_s=1.0)
    return 2 * n**3 / (ms * 1e-3)


def time_fn(fn, budget_s: float = 0.6, min_reps: int = 5, max_reps: int = 100,
            warmup: int = 3) -> float:
    """Median milliseconds of `fn` over CUDA-event-timed runs, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(once, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _init_(module: nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def build(impl: str, shape: str):
    D, F, E, k, act, shared, router = SHAPES[shape]
    dev, dt = "cuda", torch.bfloat16
    if impl.startswith("moeflow"):
        spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F,
                       num_shared_experts=shared, shared_d_ff=F * shared, router=router)
        layer = MoELayer(spec, D, act, bias=False).to(dev, dt)
        _init_(layer, D ** -0.5)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.normal_(0, 0.01)
        if impl == "moeflow-ref":
            layer.router.backend = layer.dispatcher.backend = layer.experts.backend = "reference"
        return lambda x: layer(x)[0], layer
    shared_mlp = DenseMLP(D, F * shared, act).to(dev, dt) if shared else None
    if impl == "deepspeed":
        from deepspeed.moe.layer import MoE
        peer = MoE(D, DenseMLP(D, F, act).to(dev, dt), num_experts=E, ep_size=1, k=k,
                   capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4).to(dev, dt)
        peer.set_deepspeed_parallelism()
        run = lambda x: peer(x)[0]  # noqa: E731
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                            num_experts_per_tok=k, hidden_act="silu" if act == "swiglu" else "gelu")
        cfg._experts_implementation = impl.removeprefix("hf-")
        peer = MixtralSparseMoeBlock(cfg).to(dev, dt)
        run = peer
    _init_(peer, D ** -0.5)
    mods = nn.ModuleList([peer] + ([shared_mlp] if shared_mlp is not None else []))
    if shared_mlp is not None:
        _init_(shared_mlp, D ** -0.5)
        return (lambda x: run(x) + shared_mlp(x)), mods
    return run, mods


def floors(shape: str, T: int, active_experts: int, bw: float, rate: float) -> dict:
    D, F, E, k, act, shared, _ = SHAPES[shape]
    I = 2 * F if act == "swiglu" else F
    expert_params = D * (I + F)
    shared_params = shared * D * 3 * F
    flops = 2 * T * (k * expert_params + shared_params + D * E)
    w_bytes = 2 * (active_experts * expert_params + shared_params + D * E)
    act_bytes = 2 * 2 * T * D
    fwd = max((w_bytes + act_bytes) / bw, flops / rate) * 1e3
    fb = max((3 * w_bytes + 3 * act_bytes) / bw, 3 * flops / rate) * 1e3
    return {"fwd_floor_ms": fwd, "fwdbwd_floor_ms": fb, "flops": flops, "weight_bytes": w_bytes,
            "active_experts": active_experts,
            "fwd_bound": "memory" if (w_bytes + act_bytes) / bw > flops / rate else "compute"}


def skip_reason(impl: str, shape: str, T: int, mode: str) -> str | None:
    D, F, E, k, act, shared, _ = SHAPES[shape]
    if impl == "deepspeed":
        cap = max(4, math.ceil(k * T / E))
        dense = T * E * cap  # DeepSpeed's one-hot dispatch/combine tensors are [T, E, capacity]
        need = dense * 20 + 2 * E * D * (3 if act == "swiglu" else 2) * F * (2 if mode ==
                                                                                  "fwd+bwd" else 1)
        if need > 0.85 * GPU_BYTES:
            return f"est. {need / 2**30:.0f} GiB: dense [T,E,C]=[{T},{E},{cap}] dispatch tensors"
    return None


def run_cell(fn, params, x, g, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
    else:
        def step():
            for p in params:
                p.grad = None
            x.grad = None
            fn(x).backward(g)
    return time_fn(step)


def main() -> None:
    global GPU_BYTES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[8, 128, 4096, 16384])
    ap.add_argument("--impls", nargs="*", default=list(IMPLS))
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="moe_layer")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    GPU_BYTES = props.total_memory
    if "deepspeed" in args.impls:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29517")
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    bw, rate = measure_bandwidth(), measure_gemm_rate()
    print(f"{props.name}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} "
          f"TFLOP/s", flush=True)
    result = {"gpu": props.name, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
              "bandwidth_Bps": bw, "bf16_flops": rate, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{args.tag}.json")
    for shape in args.shapes:
        D, F, E, k, act, shared, router = SHAPES[shape]
        for T in args.tokens:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = torch.randn_like(x)
            row = {"shape": shape, "T": T, "times_ms": {}, "skipped": {}}
            for impl in args.impls:
                try:
                    fn, mod = build(impl, shape)
                except Exception as exc:  # noqa: BLE001  (a peer that cannot be built)
                    for mode in args.modes:
                        row["skipped"][f"{impl}/{mode}"] = f"build failed: {exc!r}"[:200]
                    continue
                if impl == "moeflow" and "floor" not in row:
                    with torch.no_grad():
                        routing = mod.router(x)
                    active = int((routing.counts_E > 0).sum())
                    row["floor"] = floors(shape, T, active, bw, rate)
                    row["dropped"] = int(routing.num_dropped)
                params = [p for p in mod.parameters() if p.requires_grad]
                for mode in args.modes:
                    key = f"{impl}/{mode}"
                    reason = skip_reason(impl, shape, T, mode)
                    if reason:
                        row["skipped"][key] = reason
                        continue
                    xi = x.clone().requires_grad_(mode != "fwd")
                    try:
                        row["times_ms"][key] = run_cell(fn, params, xi, g, mode)
                    except torch.OutOfMemoryError:
                        row["skipped"][key] = "out of GPU memory"
                    except Exception as exc:  # noqa: BLE001
                        row["skipped"][key] = f"failed: {exc!r}"[:200]
                    print(f"{shape} T={T} {key}: {row['times_ms'].get(key, row['skipped'].get(key))}",
                          flush=True)
                del fn, mod, params
                torch.cuda.empty_cache()
            result["rows"].append(row)
            with open(json_path, "w") as fh:
                json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as fh:
        fh.write(markdown(result, args.impls, args.modes))
    print(markdown(result, args.impls, args.modes))


def markdown(result: dict, impls, modes) -> str:
    lines = [f"# MoE layer benchmark — {result['gpu']}, {result['date']}", "",
             f"Command: `{result['command']}` (torch {result['torch']}). Measured copy bandwidth "
             f"{result['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM "
             f"{result['bf16_flops'] / 1e12:.0f} TFLOP/s. Each cell: median ms (× floor).", ""]
    notes = []
    for mode in modes:
        lines += [f"## {mode}", "",
                  "| shape | T | floor ms | " + " | ".join(impls) + " |",
                  "|---|---|---|" + "---|" * len(impls)]
        for row in result["rows"]:
            fl = row.get("floor", {}).get("fwd_floor_ms" if mode == "fwd" else "fwdbwd_floor_ms")
            cells = []
            for impl in impls:
                key = f"{impl}/{mode}"
                if key in row["times_ms"]:
                    t = row["times_ms"][key]
                    cells.append(f"{t:.3f} ({t / fl:.1f}×)" if fl else f"{t:.3f}")
                else:
                    notes.append(f"{row['shape']} T={row['T']} {key}: "
                                 f"{row['skipped'].get(key, 'not run')}")
                    cells.append(f"— [{len(notes)}]")
            fl_s = f"{fl:.3f}" if fl else "?"
            lines.append(f"| {row['shape']} | {row['T']} | {fl_s} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["Not timed:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
