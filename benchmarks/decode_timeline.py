"""Device timeline of one engine decode step, replayed from its CUDA graph as served: where the
batch-1 (and batch-16) step's time goes, kernel by kernel, and how much of it is gaps.

decode_study.py profiles an eager step (every launch paid by the host) because older profilers
did not see the kernels inside a graph replay; CUPTI on CUDA 12+ does record them, each with its
own start and end, so this takes the served step itself. Per batch size:
- the step's CUDA-event time (median of 20 graph replays) and the profiled replay's kernels:
  count, summed duration, span and summed idle gaps between consecutive kernels;
- per kernel name: count per step, mean duration, mean gap before it, total;
- the kernel sequence of one middle layer (each kernel's duration and the gap before it), and
  per kernel of that sequence its end step (its end minus the previous kernel's end) averaged
  over the layers: what it adds to the step when kernels overlap under PDL.

    PYTHONPATH=. python benchmarks/decode_timeline.py --out DIR [--model qwen3-30b-a3b]
        [--batches 1 16] [--prompt 32] [--variant label=field:value,... ...]
        [--linear-config BN,BK,WARPS,STAGES,SWAP] [--router-places]

Each --variant (repeatable; default one, `auto=`, Backends' defaults) forces Backends fields on
the same model; variants run one after the other in one process.

Writes DIR/decode_timeline.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PROMPT, build  # noqa: E402

from benchmarks.machine import cuda_event_ms, cuda_kernel_events  # noqa: E402

import moeflow.model.moe as moe  # noqa: E402
import moeflow.ops.skinny_linear_triton as skinny_linear_triton  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.decode_graphs import GraphDecoder  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402


def summarise(kernels: list, n_layers: int) -> dict:
    if not kernels:
        return {"kernels": 0}
    gaps, prev_end = [], kernels[0].time_range.start
    for k in kernels:
        gaps.append(max(0.0, k.time_range.start - prev_end))
        prev_end = max(prev_end, k.time_range.end)
    by_name: dict = defaultdict(lambda: [0, 0.0, 0.0])
    for k, gap in zip(kernels, gaps):
        row = by_name[k.name[:80]]
        row[0] += 1
        row[1] += k.time_range.elapsed_us()
        row[2] += gap
    names = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    per_layer = len(kernels) // max(n_layers, 1)
    mid = (n_layers // 2) * per_layer
    return {
        "kernels": len(kernels),
        "busy_us": round(sum(k.time_range.elapsed_us() for k in kernels), 1),
        "span_us": round(kernels[-1].time_range.end - kernels[0].time_range.start, 1),
        "gaps_us": round(sum(gaps), 1),
        "by_name": [[n, c, round(t, 1), round(t / c, 2), round(g / c, 2)]
                    for n, (c, t, g) in names],
        "middle_layer": [[k.name[:80], round(k.time_range.elapsed_us(), 2), round(g, 2)]
                         for k, g in zip(kernels[mid:mid + per_layer],
                                         gaps[mid:mid + per_layer])],
        "layer_path": layer_path(kernels, [k.name for k in kernels[mid:mid + per_layer]]),
    }


def layer_path(kernels: list, layer: list[str]) -> dict:
    """Each kernel's share of the layer's time, averaged over every layer whose kernels run in
    the middle layer's order. Under programmatic dependent launch a kernel starts while the one
    before it still runs and waits inside, so its duration overstates its cost; its end minus
    the previous kernel's end does not: those steps add up to the layer's period. Per position:
    mean duration, mean start before the previous end (the overlap) and mean end step."""
    n = len(layer)
    names = [k.name for k in kernels]
    starts = [i for i in range(1, len(kernels) - n + 1) if names[i:i + n] == layer]
    layers = [starts[0]] if starts else []
    for i in starts[1:]:
        if i >= layers[-1] + n:  # non-overlapping occurrences
            layers.append(i)
    rows = []
    for j, name in enumerate(layer):
        dur = [kernels[i + j].time_range.elapsed_us() for i in layers]
        prev_end = [kernels[i + j - 1].time_range.end for i in layers]
        early = [p - kernels[i + j].time_range.start for i, p in zip(layers, prev_end)]
        step = [kernels[i + j].time_range.end - p for i, p in zip(layers, prev_end)]
        rows.append([name[:80], round(sum(dur) / len(dur), 2), round(sum(early) / len(early), 2),
                     round(sum(step) / len(step), 2)])
    return {"layers": len(layers), "rows": rows,
            "period_us": round(sum(r[3] for r in rows), 2) if rows else 0.0}


def measure(model, batch: int, max_seq_len: int, prompt: int = PROMPT) -> dict:
    """The decode step of `batch` requests of `prompt` random tokens, after the prefill and
    four steps (capture, warm-up), from its CUDA graph."""
    vocab = model.config.vocab_size
    engine = Engine(model, EngineConfig(max_batch_size=max(batch, 1), max_seq_len=max_seq_len))
    g = torch.Generator().manual_seed(batch)
    ids = [engine.add_request(torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                              SamplingParams(max_new_tokens=64, temperature=0))
           for _ in range(batch)]
    engine.step()  # prefill
    for _ in range(4):  # capture + warm
        engine.step()
    dec = engine._decoder
    if not isinstance(dec, GraphDecoder):
        sys.exit("decode_timeline: the engine decodes without CUDA graphs here (a GPU is needed)")
    graph = dec.graphs[dec.last_key][0]
    with dec.held_state():  # the replays advance the lengths: back as the engine left them
        replay_ms = cuda_event_ms(graph.replay, 20)
        replay = summarise(cuda_kernel_events(graph.replay), model.config.n_layers)
    if not replay["kernels"]:
        sys.exit("decode_timeline: the profiler saw no kernels inside the graph replay")
    out = {"batch": batch, "graph_replay_ms": replay_ms, "replay": replay}
    for rid in ids:
        engine.abort(rid)
    return out


def markdown(res: dict) -> str:
    lines = [f"# Decode step timeline — {res['gpu']}, {res['date']}", "",
             f"Model {res['model']}, torch {res['torch']}; command `{res['command']}`.", "",
             "| variant | forced | " + " | ".join(f"b{b} replay ms | b{b} kernels | b{b} busy µs"
                                                  for b in res["batches"]) + " |",
             "|---|---|" + "---:|---:|---:|" * len(res["batches"])]
    for label, v in res["variants"].items():
        cells = []
        for r in v["batches"]:
            cells.append(f"{r['graph_replay_ms']:.3f} | {r['replay']['kernels']} | "
                         f"{r['replay']['busy_us']}")
        lines.append(f"| {label} | {v['forced']} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, v in res["variants"].items():
        lines += [f"# Variant {label}", ""] + batch_sections(v["batches"])
    return "\n".join(lines)


def batch_sections(batches: list) -> list[str]:
    lines = []
    for r in batches:
        t = r["replay"]
        lines += [f"## Batch {r['batch']}: graph replay {r['graph_replay_ms']:.3f} ms; "
                  f"{t['kernels']} kernels, {t['busy_us']} µs busy, "
                  f"{t['gaps_us']} µs of gaps over a {t['span_us']} µs span", "",
                  "| kernel | per step | µs total | µs mean | mean gap before, µs |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| `{n}` | {c} | {t_} | {m} | {g} |" for n, c, t_, m, g in t["by_name"]]
        lines += ["", "One middle layer, in order (µs, gap before):", ""]
        lines += [f"- {n}: {d} (gap {g})" for n, d, g in t["middle_layer"]]
        path = t.get("layer_path")
        if path and path["rows"]:
            lines += ["", f"Layer period {path['period_us']} µs, mean over {path['layers']} "
                      "layers run in that order: per kernel its duration, how long before "
                      "the previous kernel's end it started, and its end minus that end "
                      "(the steps add up to the period):", "",
                      "| kernel | µs mean | started early, µs | end step, µs |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{n}` | {d} | {e} | {st} |" for n, d, e, st in path["rows"]]
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--variant", action="append",
                    help="label=field:value,... : Backends fields forced (repeatable)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=PROMPT,
                    help="prompt tokens per request: the replayed step attends over about this "
                         "many positions plus four (the steps before it); from 64 on, the "
                         "attention runs two or more key splits and merges them")
    ap.add_argument("--linear-config", metavar="BN,BK,WARPS,STAGES,SWAP",
                    help="run the dense projections' MMA stream kernel (2-16 rows) with this one "
                         "config instead of moeflow.ops.skinny_linear_triton.linear_config's")
    ap.add_argument("--router-places", action="store_true",
                    help="the decode router places the rows itself (its pass 2) instead of "
                         "leaving them to the experts' kernel at <= 16 tokens")
    args = ap.parse_args()
    if args.linear_config:
        bn, bk, warps, stages, swap = (int(v) for v in args.linear_config.split(","))
        config = {"BLOCK_N": bn, "BLOCK_K": bk, "SWAP": bool(swap), "num_warps": warps,
                  "num_stages": stages}
        skinny_linear_triton.linear_config = lambda N, K: config
    if args.router_places:
        moe.EXPERTS_PLACE_MAX_TOKENS = 0
    model = build(args.model)
    res = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "model": args.model, "batches": args.batches,
           "command": "python " + " ".join(sys.argv), "variants": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.variant or ["auto="]:
        label, _, fields = spec.partition("=")
        forced = dict(f.split(":", 1) for f in fields.split(",") if f)
        model.set_backends(Backends(**forced))
        v = res["variants"][label] = {"forced": forced, "batches": []}
        for batch in args.batches:
            v["batches"].append(measure(model, batch, args.max_seq_len, args.prompt))
            r = v["batches"][-1]
            t = r["replay"]
            print(f"{label} batch {batch}: replay {r['graph_replay_ms']:.3f} ms, "
                  f"{t['kernels']} kernels, busy {t['busy_us']} µs, gaps {t['gaps_us']} µs",
                  flush=True)
            (out / "decode_timeline.json").write_text(json.dumps(res, indent=1))
            (out / "decode_timeline.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
