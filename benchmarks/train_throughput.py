"""Training throughput of an MoE on 1..N GPUs, MFU, and the token exchange's bandwidth.

    # one GPU: tokens/s and MFU against the bf16 GEMM rate measured in the same process
    python benchmarks/train_throughput.py --out single.json
    # the same with the attention, MLP and expert matmuls in FP8 (TrainConfig.fp8)
    python benchmarks/train_throughput.py --fp8 --out single-fp8.json
    # EP weak scaling (same model, same micro-batch per GPU, experts spread over N GPUs) and
    # all-to-all bandwidth: moeflow's exchanges next to torch.distributed.all_to_all_single
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/train_throughput.py --ep 4 \
        --a2a --out ep4.json
    python benchmarks/train_throughput.py --report single.json ep2.json ep4.json > results.md

What is measured. One training step = forward, cross-entropy + router loss, backward (each
--grad-accum times, on fresh micro-batches), gradient reduction (moeflow.parallel.grads and
.overlap; none on one GPU), AdamW step; the results of 2026-11-22 in
benchmarks/results/parallel.md predate the overlapped reduction. The model and AdamW run in
bf16 (no fp32 master copy), with moeflow's default kernel choice ("auto"). Each step is timed
with CUDA events after warm-up steps; the median is reported. Per GPU, every micro-batch is
micro_batch × seq fresh random tokens, so with EP=N the global batch is N times larger (weak
scaling): efficiency = (tokens/s per GPU at N) / (tokens/s on one GPU without expert
parallelism).

MFU = model FLOPs per second / the measured bf16 GEMM rate (8192³ matmul, median of 20), with
model FLOPs per token from moeflow.model.flops (PaLM's formula). With --fp8 the denominator
stays the bf16 rate, so MFU compares directly with the bf16 run's; the FP8 GEMM rate
(torch._scaled_mm, rowwise scales, 8192³, quantization excluded) is recorded beside it as
gemm_fp8_tflops, the ceiling an FP8 run's GEMMs could reach.

All-to-all bandwidth = bytes each rank sends / time (its own chunk included), for equal splits
of the same total size: NCCL's all_to_all_single, moeflow's flat exchange as the dispatcher runs
it (split sizes exchanged first, then the uneven all-to-all), and the hierarchical exchange with
two "nodes" of N/2 GPUs (intra-node, layout transform, inter-node).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cuda_event_ms  # noqa: E402
from moeflow.config import ModelConfig  # noqa: E402
from moeflow.model import Transformer, parameter_counts  # noqa: E402
from moeflow.model.flops import training_flops_per_token  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.ops.linear_cross_entropy import next_token_loss  # noqa: E402


def gemm_tflops(device: torch.device, n: int = 8192, reps: int = 20, fp8: bool = False
                ) -> float:
    """The n³ GEMM rate: bf16, or with `fp8` torch._scaled_mm on e4m3 operands with rowwise
    scales as moeflow.ops.fp8_linear calls it (quantization not included)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm = lambda: a @ b  # noqa: E731
    if fp8:
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        scale_a = torch.ones(n, 1, device=device)
        scale_b = torch.ones(1, n, device=device)
        gemm = lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b,  # noqa: E731
                                        out_dtype=torch.bfloat16, use_fast_accum=False)
    return 2 * n ** 3 / (cuda_event_ms(gemm, reps, warmup=3) / 1e3) / 1e12


def timed(fn, warmup: int, reps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def profile_steps(step, path: str, device: torch.device, steps: int = 2) -> None:
    """Profile `steps` more steps; write the ops by GPU time (self) and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / steps
    avg = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).write_text(f"{steps} steps profiled, {wall * 1e3:.1f} ms wall per step\n\n"
                          + avg.table(sort_by=sort, row_limit=40) + "\n\n"
                          + avg.table(sort_by="cpu_time_total", row_limit=25) + "\n")


def train_bench(args, device: torch.device, rank: int, world: int) -> dict:
    import torch.distributed as dist

    config = ModelConfig.from_name(args.preset)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    backends = Backends(dense="compiled" if args.compile else "auto",
                        matmul="fp8" if args.fp8 else "auto")
    with torch.device(device):
        model = Transformer(config, backends).to(dtype)
    groups = None
    if args.ep > 1:
        from moeflow.parallel import ParallelConfig, shard_model
        groups = shard_model(model, ParallelConfig(ep=args.ep))
    overlap = None
    if groups is not None:
        from moeflow.parallel import ShardedOptimizer, reduce_gradients
        from moeflow.parallel.grads import replication_groups
        from moeflow.parallel.overlap import OverlappedGradReducer
        opt = ShardedOptimizer(model, groups, torch.optim.AdamW, lr=1e-4,
                               fused=device.type == "cuda")
        if not args.no_overlap:
            dense = replication_groups(model, groups)[0][1]
            overlap = OverlappedGradReducer(dense, groups.world_group, world)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    B, T = args.micro_batch, args.seq

    accum = args.grad_accum

    def step():
        for micro in range(accum):
            tokens = torch.randint(0, config.vocab_size, (B, T + 1), device=device, generator=g)
            out = model(tokens[:, :-1], hidden_only=args.loss_chunk > 0,  # noqa: F821 (closure; a later del frees it)
                        recompute=args.recompute)
            loss = next_token_loss(out, model.lm_head.weight, tokens[:, 1:], args.loss_chunk)  # noqa: F821 (closure; a later del frees it)
            if overlap is not None and micro == accum - 1:  # reduce once, after the last
                overlap.arm()
            ((loss + out.router_loss) / accum).backward()
        if overlap is not None:
            overlap.finish()
        if groups is not None:
            reduce_gradients(model, groups, dense=overlap is None)  # noqa: F821 (closure; a later del frees it)
        opt.step()  # noqa: F821 (closure; a later del frees it)
        opt.zero_grad(set_to_none=True)  # noqa: F821 (closure; a later del frees it)

    times = timed(step, args.warmup, args.steps, device)
    if args.profile:
        profile_steps(step, f"{args.profile}.rank{rank}.txt", device)
    if world > 1:  # the slowest rank sets the pace
        t = torch.tensor(times, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    sec = statistics.median(times)
    total, active = parameter_counts(config)
    flops = training_flops_per_token(config, T)
    out = {"preset": args.preset, "dtype": args.dtype, "world": world, "ep": args.ep,
           "overlap_grads": overlap is not None,
           "micro_batch": B, "grad_accum": accum, "seq": T, "loss_chunk": args.loss_chunk,
           "recompute": args.recompute, "compile": args.compile, "fp8": args.fp8,
           "params_total": total, "params_active": active,
           "model_flops_per_token": flops, "step_s_median": sec, "step_s_all": times,
           "tokens_per_s_per_gpu": accum * B * T / sec,
           "tokens_per_s_total": accum * B * T * world / sec,
           "max_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                              if device.type == "cuda" else None)}
    del model, opt
    return out


def a2a_bench(args, device: torch.device, rank: int, world: int) -> list[dict]:
    import torch.distributed as dist

    from moeflow.parallel.all_to_all import (all_to_all, exchange_counts, gather_counts,
                                             hierarchical_all_to_all)
    from moeflow.parallel.mesh import ParallelConfig, ParallelLayout, ProcessGroups

    hier = None
    if world >= 4 and world % 2 == 0:
        cfg = ParallelConfig(ep=world, hierarchical=True, ranks_per_node=world // 2)
        layout = ParallelLayout.build(cfg, world, rank, {0: world})
        hier = ProcessGroups(layout).by_size(world)
    D = 2048
    rows_per_mib = 2 ** 20 // (D * 2)
    results = []
    for mib in args.a2a_mib:
        rows = mib * rows_per_mib // world * world
        x = torch.randn(rows, D, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        split = [rows // world] * world
        counts_P1 = torch.full((world, 1), rows // world, device=device, dtype=torch.int64)

        def nccl():
            dist.all_to_all_single(out, x)  # noqa: F821 (closure; a later del frees it)

        def moeflow_flat():
            recv = exchange_counts(counts_P1, None).view(-1).tolist()
            all_to_all(x, split, recv, None)  # noqa: F821 (closure; a later del frees it)

        row = {"mib_per_rank": mib, "bytes_per_rank": nbytes}
        for name, fn in (("nccl_all_to_all_single", nccl), ("moeflow_flat", moeflow_flat)):
            t = statistics.median(timed(fn, 3, args.a2a_reps, device))
            row[name + "_gbps"] = nbytes / t / 1e9
        if hier is not None:
            position = rank

            def moeflow_hier():
                counts_PP = gather_counts(counts_P1, None).sum(-1)
                hierarchical_all_to_all(x, counts_PP, position, hier.intra, hier.inter,  # noqa: F821 (closure; a later del frees it)
                                        hier.ranks_per_node)

            t = statistics.median(timed(moeflow_hier, 3, args.a2a_reps, device))
            row["moeflow_hierarchical_gbps"] = nbytes / t / 1e9
        row["moeflow_flat_vs_nccl"] = row["moeflow_flat_gbps"] / row["nccl_all_to_all_single_gbps"]
        results.append(row)
        del x, out
    return results


def report(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["| GPUs | EP | micro-batch × seq | FP8 | tokens/s per GPU | step (s) | MFU "
             "| weak-scaling eff. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = next((r["train"]["tokens_per_s_per_gpu"] for r in runs if r["train"]["world"] == 1),
                None)
    for r in sorted(runs, key=lambda r: r["train"]["world"]):
        t = r["train"]
        mfu = r.get("mfu")
        eff = t["tokens_per_s_per_gpu"] / base if base else None
        lines.append(f"| {t['world']} | {t['ep']} | {t['micro_batch']} × {t['seq']} | "
                     f"{'yes' if t.get('fp8') else 'no'} | "
                     f"{t['tokens_per_s_per_gpu']:,.0f} | {t['step_s_median']:.3f} | "
                     f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                     f"{'' if eff is None else f'{100 * eff:.1f}%'} |")
    for r in runs:
        if r.get("a2a"):
            lines += ["", f"All-to-all, {r['train']['world']} GPUs (GB/s per rank):", "",
                      "| MiB per rank | NCCL all_to_all_single | moeflow flat | ratio | "
                      "moeflow hierarchical |", "| --- | --- | --- | --- | --- |"]
            for a in r["a2a"]:
                h = a.get("moeflow_hierarchical_gbps")
                lines.append(f"| {a['mib_per_rank']} | {a['nccl_all_to_all_single_gbps']:.1f} | "
                             f"{a['moeflow_flat_gbps']:.1f} | {a['moeflow_flat_vs_nccl']:.2f} | "
                             f"{'' if h is None else f'{h:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="finegrained-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4,
                   help="sequences per GPU per forward pass")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="forward/backward passes per optimizer step (gradient accumulation: "
                        "the AdamW step, which reads and writes every parameter, is paid once "
                        "per this many micro-batches, as in a run with a larger global batch)")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="fuse the LM head and cross-entropy over chunks of this many tokens "
                        "(TrainConfig.loss_chunk; 0: the plain loss)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing per block (TrainConfig.recompute)")
    p.add_argument("--compile", action="store_true",
                   help="compile each block's dense part (TrainConfig.compile); the warm-up "
                        "steps pay the compilation")
    p.add_argument("--fp8", action="store_true",
                   help="the attention, MLP and expert matmuls in FP8 (TrainConfig.fp8: "
                        "Backends(matmul='fp8'))")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-overlap", action="store_true",
                   help="reduce dense gradients after backward instead of during it")
    p.add_argument("--a2a", action="store_true", help="also measure all-to-all bandwidth")
    p.add_argument("--a2a-mib", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument("--a2a-reps", type=int, default=10)
    p.add_argument("--out", help="JSON file to write (rank 0)")
    p.add_argument("--profile", metavar="PREFIX",
                   help="after timing, profile 2 steps into PREFIX.rank<r>.txt (torch.profiler)")
    p.add_argument("--report", nargs="+", help="JSON files to summarise as a markdown table")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.grad_accum < 1 or args.micro_batch < 1:
        p.error(f"--grad-accum and --micro-batch must be at least 1, got {args.grad_accum} "
                f"and {args.micro_batch}")

    from moeflow.parallel.launch import init_distributed, shutdown

    env = init_distributed()
    device = env.device
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                   time.gmtime()),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    if device.type == "cuda" and env.world == 1:
        result["gemm_bf16_tflops"] = gemm_tflops(device)
        if args.fp8:
            result["gemm_fp8_tflops"] = gemm_tflops(device, fp8=True)
    result["train"] = train_bench(args, device, env.rank, env.world)
    if "gemm_bf16_tflops" in result:
        t = result["train"]
        result["mfu"] = t["tokens_per_s_per_gpu"] * t["model_flops_per_token"] / (
            result["gemm_bf16_tflops"] * 1e12)
    if args.a2a and env.world > 1:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        result["a2a"] = a2a_bench(args, device, env.rank, env.world)
    if env.rank == 0:
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    shutdown(env)


if __name__ == "__main__":
    main()
