"""Decode attention over the slot KV cache: the reference path vs the Triton kernel, one command.

Both run through moeflow.infer.slot_cache.DecodeView.attend, as the engine's decode step runs
them, chosen by Backends.attention:
- "reference": two scatters (the new key and value into the cache), then decode_attention as
  Backends.fuse "auto" decides (its torch.compile twin on CUDA) over all S keys of the bucket;
- "triton": moeflow.ops.decode_attention_triton, one split-K pass that also stores the new
  key/value and reads each sequence's keys only up to its own length, plus a merge of the splits.

Shape: Qwen3-30B-A3B attention (32 query heads, 4 kv heads, head dim 128, bf16, 48 layers). Per
(batch B, bucket S, lengths ~S/2 or S-1): one CUDA graph of 48 calls, one per layer, each over
its own layer's cache (as a decode step runs them, and so that the keys do not sit in L2 between
calls), replayed REPS times and timed with CUDA events; the figure is the median per layer.
Bytes needed = the K/V rows the sequences actually attend to (positions 0..length, every kv
head), read once; GB/s = bytes needed / time, set against a measured ceiling (a large
device-to-device copy, bytes read + written / time). Parity: each path's first call on the same
(seeded) cache contents: max |y_triton - y_reference| and each against fp32 math, and the
written cache rows must be equal.

    PYTHONPATH=. python benchmarks/decode_attention.py --out $OUT          # one H200: ~1 min
    PYTHONPATH=. python benchmarks/decode_attention.py --smoke --out /tmp/d  # CPU, interpreter

writes OUT/decode_attention.{json,md}. `--sweep` also times the kernel alone with other
(block_n, num_warps, programs per SM) choices for every shape (more Triton compiles).
`--splits-study` instead times the kernel as the engine's decode step launches it (tickets: the
last program merges) at batch-1 and batch-16 contexts of a served step (every row one length),
with the work split as work_split chooses it, as num_splits alone did (key splits, one value
slice), and forced (key splits x value slices x block_n), in ROUNDS rounds, the configs in an
order rotated each round; writes OUT/decode_attention_splits.{json,md}. --smoke
runs tiny shapes through Triton's interpreter on the CPU (timings meaningless: it only shows the
script runs).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cpu  # noqa: E402, F401  (before the kernels: the interpreter without CUDA)
from machine import (kernel_bench_device, kernel_bench_parser,  # noqa: E402
                     write_kernel_bench)
from moeflow.infer.decode_graphs import capture_graph  # noqa: E402
from moeflow.infer.slot_cache import DecodeView, SlotKVCache  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.ops.decode_attention_triton import (decode_attention_triton,  # noqa: E402
                                                 num_splits, work_split)



@dataclass(frozen=True)
class Shape:
    H: int = 32  # Qwen3-30B-A3B
    G: int = 4
    HD: int = 128
    layers: int = 48
    dtype: torch.dtype = torch.bfloat16


QWEN3 = Shape()
SMOKE = Shape(H=4, G=2, HD=16, layers=2, dtype=torch.float32)
BATCHES, KV_LENS = (1, 16, 64), (512, 2048, 8192)
REPS = 10
# (block_n, num_warps, programs per SM the key splits aim for); the kernel's default for this
# shape is (64, 4, 2), repeated here as the control.
SWEEP = ((64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2), (64, 4, 1), (64, 4, 4), (64, 4, 8))


def lengths_for(B: int, S: int, fill: str, device) -> torch.Tensor:
    """Per-row lengths (the new token's position): around S/2 (spread +-S/8) or all S - 1."""
    if fill == "full":
        return torch.full((B,), S - 1, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(B * S)
    spread = torch.randint(-(S // 8), S // 8 + 1, (B,), generator=g)
    return (S // 2 + spread).clamp(0, S - 1).to(device)


def make_cache(sh: Shape, B: int, S: int, attention: str, device) -> SlotKVCache:
    cache = SlotKVCache([(sh.G, sh.HD, sh.HD)] * sh.layers, B, S, sh.dtype, device,
                        Backends(attention=attention))
    torch.manual_seed(1)  # the same contents for both paths
    cache.k_LNGMd.normal_()
    cache.v_LNGMd.normal_()
    return cache


def inputs(sh: Shape, B: int, device):
    torch.manual_seed(2)
    return (torch.randn(B, sh.H, 1, sh.HD, device=device, dtype=sh.dtype),
            torch.randn(B, sh.G, 1, sh.HD, device=device, dtype=sh.dtype),
            torch.randn(B, sh.G, 1, sh.HD, device=device, dtype=sh.dtype))


def splits_for(batch_heads: int, S: int, block_n: int, per_sm: int, device) -> int:
    """Key splits aiming at `per_sm` programs per SM (num_splits' rule with another target)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else 4
    return max(1, min(-(-per_sm * sms // batch_heads), -(-S // block_n)))


def time_per_call(fn, calls: int, device, reps: int = REPS) -> float:
    """Median µs per call of `fn` (which makes `calls` calls) over `reps` replays of its CUDA
    graph, timed with events, on a GPU; one timed eager run after a warm-up elsewhere."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6 / calls
    graph, _ = capture_graph(fn, (), None)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def fp32_attention(sh: Shape, q, k_new, v_new, k_cache, v_cache, lengths_B) -> torch.Tensor:
    """Exact math on layer 0's cache with the new rows put in: [B, H, HD] fp32."""
    k = k_cache.float().clone()
    v = v_cache.float().clone()
    rows = torch.arange(len(lengths_B), device=lengths_B.device)
    k[rows, :, lengths_B] = k_new[:, :, 0].float()
    v[rows, :, lengths_B] = v_new[:, :, 0].float()
    B, S = k.shape[0], k.shape[2]
    q_BGQd = q[:, :, 0].float().view(B, sh.G, sh.H // sh.G, sh.HD)
    s = torch.einsum("bgqd,bgsd->bgqs", q_BGQd, k) * sh.HD**-0.5
    visible = torch.arange(S, device=k.device)[None, :] <= lengths_B[:, None]
    p = s.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)
    return torch.einsum("bgqs,bgsd->bgqd", p, v).reshape(B, sh.H, sh.HD)


def measure(sh: Shape, B: int, S: int, fill: str, device, sweep: bool) -> dict:
    lengths_B = lengths_for(B, S, fill, device)
    q, k_new, v_new = inputs(sh, B, device)
    layers = sh.layers
    row = {"batch": B, "kv_len": S, "fill": fill,
           "mean_length": float(lengths_B.float().mean())}
    kv_row = sh.G * 2 * sh.HD * (torch.finfo(sh.dtype).bits // 8)  # one position's K and V
    row["bytes_needed"] = int((lengths_B + 1).sum()) * kv_row
    row["bytes_reference_reads"] = B * S * kv_row  # every key of the bucket
    outs = {}
    for attention in ("reference", "triton"):
        cache = make_cache(sh, B, S, attention, device)
        view = DecodeView(cache, lengths_B, S)
        with torch.no_grad():
            if attention == "reference":
                exact = fp32_attention(sh, q, k_new, v_new, cache.k_LNGMd[0], cache.v_LNGMd[0],
                                       lengths_B)
            y = view.attend(0, q, k_new, v_new)[:, :, 0]
            rows = torch.arange(B, device=device)
            written = (cache.k_LNGMd[0, rows, :, lengths_B].clone(),
                       cache.v_LNGMd[0, rows, :, lengths_B].clone())
            outs[attention] = (y.float(), written)

            def step(view=view):
                for layer in range(layers):
                    view.attend(layer, q, k_new, v_new)

            row[f"{attention}_us"] = time_per_call(step, layers, device)
            if attention == "triton" and sweep:
                for block_n, warps, per_sm in SWEEP:
                    splits = splits_for(B * sh.G, S, block_n, per_sm, device)

                    def kernel_step(block_n=block_n, warps=warps, splits=splits, cache=cache):
                        for layer in range(layers):
                            decode_attention_triton(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0],
                                                    cache.k_LNGMd[layer], cache.v_LNGMd[layer],
                                                    lengths_B, S, splits=splits,
                                                    block_n=block_n, num_warps=warps)
                    row[f"triton_us_bn{block_n}_w{warps}_sm{per_sm}"] = time_per_call(
                        kernel_step, layers, device)
        del view, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (y_ref, w_ref), (y_tri, w_tri) = outs["reference"], outs["triton"]
    row["max_abs_err_triton_vs_reference"] = float((y_tri - y_ref).abs().max())
    row["max_abs_err_triton_vs_fp32"] = float((y_tri - exact).abs().max())
    row["max_abs_err_reference_vs_fp32"] = float((y_ref - exact).abs().max())
    row["cache_rows_equal"] = all(torch.equal(a, b) for a, b in zip(w_ref, w_tri))
    for name in ("reference", "triton"):
        row[f"{name}_gbps_needed"] = row["bytes_needed"] / row[f"{name}_us"] / 1e3
    row["speedup"] = row["reference_us"] / row["triton_us"]
    return row


# (batch, bucket S, every row's length) as the served decode steps see them (decode_served.py's
# contexts 36 and 76: buckets of 64 and 128 keys), and a 256-key bucket.
SPLIT_CASES = ((1, 64, 36), (1, 128, 76), (1, 128, 110), (16, 64, 36), (16, 128, 76),
               (1, 256, 200))
# (key splits, value slices, block_n) forced; "rule" (work_split) and "keys" (num_splits, one
# slice: the rule before value slices) are timed beside them.
SPLIT_CONFIGS = ((1, 1, 64), (1, 2, 64), (1, 4, 64), (1, 4, 128), (2, 1, 64), (2, 2, 64),
                 (2, 4, 64))
ROUNDS = 3


def splits_study(sh: Shape, device, cases=SPLIT_CASES) -> tuple[list[dict], str]:
    """µs per layer of the kernel with tickets at `cases` for each work split."""
    rows = []
    for B, S, length in cases:
        lengths_B = torch.full((B,), length, dtype=torch.int64, device=device)
        q, k_new, v_new = inputs(sh, B, device)
        cache = make_cache(sh, B, S, "triton", device)
        tickets = torch.zeros(B * sh.G, dtype=torch.int32, device=device)
        rule = work_split(B * sh.G, S, 64, sh.HD, device)
        configs = {"rule": (None, None, None),
                   "keys": (num_splits(B * sh.G, S, 64, device), 1, None)}
        configs.update({f"P{p}_V{v}_bn{bn}": (p, v, bn) for p, v, bn in SPLIT_CONFIGS
                        if p <= -(-S // bn) and sh.HD // v >= 16})
        outs, times = {}, {name: [] for name in configs}

        def step(splits, slices, block_n, cache=cache, B=B):
            for layer in range(sh.layers):
                decode_attention_triton(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0],
                                        cache.k_LNGMd[layer], cache.v_LNGMd[layer], lengths_B,
                                        S, splits=splits, block_n=block_n, tickets=tickets,
                                        value_splits=slices)
        names = list(configs)
        for r in range(ROUNDS):
            for name in names[r % len(names):] + names[:r % len(names)]:
                splits, slices, block_n = configs[name]
                with torch.no_grad():
                    if name not in outs:
                        k0, v0 = cache.k_LNGMd[0].clone(), cache.v_LNGMd[0].clone()
                        outs[name] = decode_attention_triton(
                            q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], k0, v0, lengths_B, S,
                            splits=splits, block_n=block_n, tickets=tickets,
                            value_splits=slices).float()
                    times[name].append(time_per_call(
                        lambda: step(splits, slices, block_n), sh.layers, device))
        row = {"batch": B, "kv_len": S, "length": length, "rule": list(rule),
               "us": {name: statistics.median(t) for name, t in times.items()},
               "rounds_us": times,
               "max_abs_diff_vs_keys": max(float((y - outs["keys"]).abs().max())
                                           for y in outs.values())}
        rows.append(row)
        print(f"B={B} S={S} length {length} rule {rule}: " + "  ".join(
            f"{n} {u:.2f}" for n, u in row["us"].items()), flush=True)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    names = ["rule", "keys"] + [f"P{p}_V{v}_bn{bn}" for p, v, bn in SPLIT_CONFIGS]
    md = ("| B | S | length | rule (P, slices) | " + " | ".join(names) + " | max diff |\n|"
          + "---|" * (len(names) + 5) + "\n")
    for r in rows:
        md += (f"| {r['batch']} | {r['kv_len']} | {r['length']} | {tuple(r['rule'])} | "
               + " | ".join(f"{r['us'][n]:.2f}" if n in r["us"] else "-" for n in names)
               + f" | {r['max_abs_diff_vs_keys']:.1e} |\n")
    return rows, md


def copy_ceiling_gbps(device) -> float | None:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 5)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 31, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    gbps = 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def table(rows: list[dict], ceiling: float | None) -> str:
    head = ("| B | S | lengths | reference µs/layer | triton µs/layer | speedup | triton GB/s "
            "(needed bytes) | reference GB/s (needed) | max abs err tri-ref | tri / ref vs fp32 "
            "|\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        frac = f" ({r['triton_gbps_needed'] / ceiling:.0%} of copy)" if ceiling else ""
        lines.append(f"| {r['batch']} | {r['kv_len']} | {r['fill']} (mean {r['mean_length']:.0f})"
                     f" | {r['reference_us']:.1f} | {r['triton_us']:.1f} | {r['speedup']:.2f}x"
                     f" | {r['triton_gbps_needed']:.0f}{frac} | {r['reference_gbps_needed']:.0f}"
                     f" | {r['max_abs_err_triton_vs_reference']:.2e}"
                     f" | {r['max_abs_err_triton_vs_fp32']:.2e} / "
                     f"{r['max_abs_err_reference_vs_fp32']:.2e} |")
    out = head + "\n".join(lines) + "\n"
    keys = [f"triton_us_bn{bn}_w{w}_sm{p}" for bn, w, p in SWEEP]
    if keys[0] in rows[0]:
        out += ("\nKernel alone, µs/layer by (block_n, num_warps, programs per SM); the default "
                "is (64, 4, 2):\n\n| B | S | lengths | "
                + " | ".join(f"{bn}, {w}, {p}" for bn, w, p in SWEEP)
                + " |\n|---|---|---|" + "---|" * len(keys) + "\n")
        for r in rows:
            out += (f"| {r['batch']} | {r['kv_len']} | {r['fill']} | "
                    + " | ".join(f"{r[k]:.1f}" for k in keys) + " |\n")
    return out


def main() -> None:
    ap = kernel_bench_parser(__doc__)
    ap.add_argument("--sweep", action="store_true",
                    help="also time other (block_n, num_warps, programs per SM) choices")
    ap.add_argument("--splits-study", action="store_true",
                    help="time the engine's launch at served contexts for each work split")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = kernel_bench_device(args.smoke)
    sh, batches, kv_lens = (SMOKE, (1, 3), (32, 64)) if args.smoke else (QWEN3, BATCHES, KV_LENS)
    if args.splits_study:
        rows, md = splits_study(sh, device, ((1, 32, 20), (3, 64, 40)) if args.smoke
                                else SPLIT_CASES)
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "torch": torch.__version__,
                "command": " ".join(sys.argv), "seconds": time.perf_counter() - t_start}
        md = (f"# Decode attention work splits, µs per layer ({meta['device']}, {meta['date']})"
              f"\n\n`{meta['command']}`; median of {ROUNDS} rounds of {sh.layers}-layer "
              f"graphs, each the median of {REPS} replays.\n\n" + md)
        write_kernel_bench(args.out, "decode_attention_splits", meta, rows, md)
        return
    ceiling = copy_ceiling_gbps(device)
    rows = []
    for S in kv_lens:
        for B in batches:
            for fill in ("half", "full"):
                r = measure(sh, B, S, fill, device, args.sweep)
                rows.append(r)
                print(f"B={B:3d} S={S:5d} {fill}: reference {r['reference_us']:8.1f} µs  "
                      f"triton {r['triton_us']:8.1f} µs  ({r['speedup']:.2f}x, "
                      f"{r['triton_gbps_needed']:.0f} GB/s needed)  max abs err "
                      f"{r['max_abs_err_triton_vs_reference']:.2e}  cache rows equal "
                      f"{r['cache_rows_equal']}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "command": " ".join(sys.argv), "shape": {"H": sh.H, "G": sh.G, "head_dim": sh.HD,
                                                     "layers": sh.layers, "dtype": str(sh.dtype)},
            "copy_ceiling_gbps": ceiling, "seconds": time.perf_counter() - t_start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                               indent=1))
    md = (f"# Decode attention: reference vs Triton ({meta['device']}, {meta['date']})\n\n"
          f"`{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; H={sh.H}, "
          f"G={sh.G}, head dim {sh.HD}, {sh.dtype}, {sh.layers} layers per graph; copy ceiling "
          f"{'-' if ceiling is None else f'{ceiling:.0f} GB/s'}.\n\n" + table(rows, ceiling))
    (args.out / "decode_attention.md").write_text(md)
    print(md)
    print(f"total {meta['seconds']:.1f} s")
    bad = [r for r in rows if not r["cache_rows_equal"]]
    if bad:
        raise SystemExit(f"moeflow: error: the kernel wrote different cache rows for {len(bad)} "
                         f"shapes")


if __name__ == "__main__":
    main()
