"""Host time of CUDAGraph.replay() for the engine's decode graphs, alone: is the ~320 µs that a
served batch-16 step spends inside replay() (benchmarks/served_host_probe.py, session 14) the
graph's launch cost, or something around it? Per batch 1 and 16 (Qwen3-30B-A3B shape, random
weights): the engine decodes a few steps (capturing its graph), then the graph is replayed 30
times, synchronised before each, timing only the replay() call on the host; and 10 times as the
second of two back-to-back replays.

    PYTHONPATH=. python benchmarks/graph_launch_probe.py    # one H200: ~1 min
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build, decoding_engine  # noqa: E402


def main() -> None:
    model = build("qwen3-30b-a3b")
    for batch in (1, 16):
        engine = decoding_engine(model, batch)
        graph = engine._decoder.graphs[engine._decoder.last_key][0]
        alone, second = [], []
        with engine._decoder.held_state():  # the replays advance the lengths
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                graph.replay()
                alone.append((time.perf_counter() - t0) * 1e6)
            for _ in range(10):
                torch.cuda.synchronize()
                graph.replay()
                t0 = time.perf_counter()
                graph.replay()
                second.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        print(f"batch {batch}: replay() host µs median {statistics.median(alone):.1f} "
              f"(min {min(alone):.1f}, max {max(alone):.1f}); second of two back-to-back "
              f"{statistics.median(second):.1f}", flush=True)
        del engine


if __name__ == "__main__":
    main()
