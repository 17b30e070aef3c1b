"""The served decode rate beside the decode graph's own time: what a user of the engine gets per
token, and where it goes beyond the replayed graph.

decode_timeline.py times a graph replay between two CUDA events, synchronised around each: that
includes the host's graph launch, which the served loop overlaps (the engine launches step n+1
before it reads step n's tokens, moeflow.infer.engine). Per case (batch, context) this gives:
- `replay_ms`: 20 replays enqueued back to back over their events, three times (the graph's
  device time, launch overlapped; the step state the replays advance put back after each);
- `served_ms`: consecutive `engine.step()` calls, device synchronised only around 12 of them,
  twice (the engine's rate, its host work and the copies and kernels between graphs included);
- the layer path of one profiled replay (decode_timeline.layer_path: each kernel's end step),
  after the served steps: steps served after the replays and a profiled one were slower
  (session 37, batch 1, contexts 36-60: 2.5428 / 2.5075 ms against 2.4985 / 2.4982 served
  first; 76-100: 2.6027 / 2.5875 against 2.5848 / 2.5860);
- with --between, the device records between two graphs of six served steps (copies and
  kernels outside the graph, with the idle gap before each).

The context is the prompt plus the prefill's token and four steps (capture, warm-up); the served
steps add 24 more (from 64 on the attention runs two key splits at batch 1). With --sampling
every request samples (seed 0): the sampler runs after each replayed graph, outside it, so
served_ms includes it and replay_ms does not.

    PYTHONPATH=. python benchmarks/decode_served.py --out DIR [--cases 1:36 16:36 1:76]
        [--label NAME] [--sampling greedy T:K:P ...] [--between]

Writes DIR/decode_served.{json,md}; a second run with another --label and the same --out adds
its rows (an A/B of two trees: run each tree's copy of this script in turn).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_timeline import summarise  # noqa: E402
from generate import build  # noqa: E402

from benchmarks.machine import cuda_kernel_events  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.decode_graphs import GraphDecoder  # noqa: E402


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _between_graphs(engine: Engine, graph_names: set[str], steps: int = 6) -> list[list]:
    """[start µs, gap before µs, duration µs, name] of each device record of `steps` served
    steps that is not a kernel of the graph, and of every record after an idle gap > 3 µs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    rows, t0 = [], events[0].time_range.start
    prev_end = t0
    for e in events:
        gap = e.time_range.start - prev_end
        if e.name[:80] not in graph_names or gap > 3:
            rows.append([round(e.time_range.start - t0, 1), round(gap, 1),
                         round(e.time_range.elapsed_us(), 1), e.name[:70]])
        prev_end = max(prev_end, e.time_range.end)
    return rows


def measure(model, batch: int, context: int, between: bool, params: SamplingParams) -> dict:
    vocab = model.config.vocab_size
    engine = Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=1024))
    g = torch.Generator().manual_seed(context)
    for _ in range(batch):
        engine.add_request(torch.randint(0, vocab, (context - 5,), generator=g).tolist(),
                           params)
    for _ in range(5):  # prefill, capture, warm-up
        engine.step()
    dec = engine._decoder
    if not isinstance(dec, GraphDecoder):
        sys.exit("decode_served: the engine decodes without CUDA graphs here (a GPU is needed)")
    graph = dec.graphs[dec.last_key][0]
    # (A tree before session 37, run with this script for an A/B, has no held_state.)
    held = getattr(dec, "held_state", contextlib.nullcontext)
    replays = []
    for _ in range(3):
        with held():  # each round from the context the served steps start at
            replays.append(round(_replay_ms(graph), 4))
    out = {"batch": batch, "context": context, "sampling": sampling_label(params),
           "graph_key": list(dec.last_key),
           "replay_ms": replays}
    served = []
    for _ in range(2):
        t0 = _sync_time()
        for _ in range(12):
            engine.step()
        served.append(round((_sync_time() - t0) * 1e3 / 12, 4))
    out["served_ms"] = served
    # The profiler last (see the module docstring).
    with held():
        summary = summarise(cuda_kernel_events(graph.replay), model.config.n_layers)
    out["kernels"] = summary["kernels"]
    out["layer_period_us"] = summary["layer_path"]["period_us"]
    out["layer_path"] = summary["layer_path"]["rows"]
    if between:
        out["between"] = _between_graphs(engine, {r[0] for r in summary["by_name"]})
    return out


def sampling_label(p: SamplingParams) -> str:
    if p.greedy:
        return "greedy"
    return f"T {p.temperature}, top-k {p.top_k}, top-p {p.top_p}"


def markdown(res: dict) -> str:
    lines = [f"# Served decode — {res['gpu']}, {res['date']}", "",
             f"Model {res['model']}, torch {res['torch']}.", "",
             "| label | sampling | batch | context | replay ms (back to back) | served ms | "
             "layer µs | kernels |", "|---|---|---:|---:|---|---|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r.get('sampling', 'greedy')} | {r['batch']} | "
                     f"{r['context']} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['replay_ms'])} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['served_ms'])} | "
                     f"{r['layer_period_us']} | {r['kernels']} |")
    for r in res["rows"]:
        lines += ["", f"## {r['label']}, batch {r['batch']}, context {r['context']}: "
                  "layer path (µs mean, started early, end step)", ""]
        lines += [f"- `{n}`: {d} / {e} / **{s}**" for n, d, e, s in r["layer_path"]]
        if "between" in r:
            lines += ["", "Between graphs (start µs, gap before, duration, name):", ""]
            lines += [f"- {a} / {b} / {c} `{n}`" for a, b, c, n in r["between"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--cases", nargs="+", default=["1:36", "16:36", "1:76"],
                    help="batch:context pairs")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--sampling", metavar="T:K:P", nargs="+", default=["greedy"],
                    help="every request samples with temperature T, top-k K (0: all), top-p P, "
                         "or `greedy` (the default); several: each case under each, in turn")
    ap.add_argument("--between", action="store_true",
                    help="also profile six served steps for what runs between the graphs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_served: needs a CUDA GPU (it times the engine's decode graphs)")
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases]
    settings = []
    for spec in args.sampling:
        if spec == "greedy":
            settings.append(SamplingParams(max_new_tokens=400, temperature=0))
            continue
        t, k, p = spec.split(":")
        settings.append(SamplingParams(max_new_tokens=400, temperature=float(t), top_k=int(k),
                                       top_p=float(p), seed=0))
    if any(ctx < 6 for _, ctx in cases):
        sys.exit("decode_served: a context must be at least 6 tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decode_served.json"
    res = json.loads(path.read_text()) if path.exists() else {
        "gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "model": args.model, "rows": []}
    res.setdefault("commands", []).append("python " + " ".join(sys.argv))
    model = build(args.model)
    for params in settings:
        for batch, context in cases:
            row = {"label": args.label, **measure(model, batch, context, args.between, params)}
            res["rows"].append(row)
            print(f"{args.label} {row['sampling']} b{batch} ctx {context}: replay "
                  f"{row['replay_ms']} ms, served {row['served_ms']} ms, layer "
                  f"{row['layer_period_us']} µs", flush=True)
            path.write_text(json.dumps(res, indent=1))
            (args.out / "decode_served.md").write_text(markdown(res))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
