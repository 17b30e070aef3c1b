"""Where a served decode step's time goes outside its CUDA graph replay: perf_counter marks
around the engine's sections (decoder call, CUDAGraph.replay, _sample, _emit) over 30 synced
engine.step() calls at batch 1 and 16 (Qwen3-30B-A3B shape, random weights, greedy), medians
in µs beside the replay's CUDA-event time; a profiler trace of two steps per batch is written.
Since session 16 the engine pipelines decode: _sample only launches the sampling and the
tokens' copy, and _emit (of the step launched before) is where the host waits.

    PYTHONPATH=. python benchmarks/served_host_probe.py OUT_DIR
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build, decoding_engine  # noqa: E402

from benchmarks.machine import cuda_event_ms  # noqa: E402

from moeflow.infer import Engine  # noqa: E402
from moeflow.infer.decode_graphs import GraphDecoder  # noqa: E402

MARKS: dict[str, list[tuple[float, float]]] = {}


def marked(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        MARKS.setdefault(name, []).append((t0, time.perf_counter()))
        return result
    return wrapper


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    GraphDecoder.__call__ = marked("decoder", GraphDecoder.__call__)
    torch.cuda.CUDAGraph.replay = marked("replay", torch.cuda.CUDAGraph.replay)
    Engine._emit = marked("emit", Engine._emit)
    Engine._sample = marked("sample", Engine._sample)
    model = build("qwen3-30b-a3b")
    for batch in (1, 16):
        engine = decoding_engine(model, batch)
        rows = []
        for _ in range(30):
            MARKS.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            (d0, _), (r0, r1) = MARKS["decoder"][0], MARKS["replay"][0]
            (e0, e1), (s0, s1) = MARKS["emit"][0], MARKS["sample"][0]
            rows.append({"wall": t1 - t0, "pre_decoder": d0 - t0, "decoder_to_replay": r0 - d0,
                         "replay_call": r1 - r0, "replay_to_emit": e0 - r1,
                         "sample_call": s1 - s0, "emit_after_sample": e1 - s1,
                         "after_emit": t1 - e1})
        med = {k: round(statistics.median(r[k] for r in rows) * 1e6, 1) for k in rows[0]}
        graph = engine._decoder.graphs[engine._decoder.last_key][0]
        with engine._decoder.held_state():  # the replays advance the lengths
            med["graph_replay_event_us"] = round(cuda_event_ms(graph.replay, 20) * 1e3, 1)
        print(f"batch {batch}: {med}", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                engine.step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(out / f"served_b{batch}.json"))
        del engine


if __name__ == "__main__":
    main()
