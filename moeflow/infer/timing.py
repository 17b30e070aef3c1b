"""Wall-clock latency of the engine: decode ms per step at a batch size, prefill ms per prompt.

Times `Engine.step()` as a user's server loop sees it (host work, sampling and CUDA-graph replay
included). Decode: the device is synchronised before and after a run of steps, not between them
(the engine overlaps its host work for one step with the GPU's next, moeflow.infer.engine), and
the run's wall time per step is reported. Prefill: one step (admission and prefill) between two
synchronisations, the median over repeats. Prompts are drawn from a caller's token pool (real
text reads experts the way serving does; random ids would route uniformly). Greedy sampling, so
the timed work is deterministic.
"""

from __future__ import annotations

import statistics
import time

import torch

from moeflow.infer.engine import Engine
from moeflow.infer.sampling import SamplingParams


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _prompt(pool: torch.Tensor, length: int, index: int) -> list[int]:
    start = (index * 7919 * length) % max(len(pool) - length, 1)
    return pool[start:start + length].tolist()


def decode_ms(engine: Engine, batch: int, steps: int, pool: torch.Tensor,
              prompt_len: int = 32, warmup: int = 3) -> float:
    """ms per decode step with `batch` running sequences over `steps` consecutive steps (the
    engine must be idle)."""
    params = SamplingParams(max_new_tokens=steps + warmup + 2, temperature=0)
    ids = [engine.add_request(_prompt(pool, prompt_len, i), params) for i in range(batch)]
    engine.step()  # admits and prefills every prompt
    for _ in range(warmup):  # graph capture, caches
        engine.step()
    t0 = _now(engine.device)
    for _ in range(steps):
        engine.step()
    ms = (_now(engine.device) - t0) * 1e3 / steps
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_work():
        engine.step()
    return ms


def prefill_ms(engine: Engine, tokens: int, pool: torch.Tensor, reps: int = 4) -> float:
    """Median ms of one step that admits and prefills a single `tokens`-long prompt (the first
    of reps + 1 runs is a warm-up)."""
    params = SamplingParams(max_new_tokens=1, temperature=0)
    times = []
    for i in range(reps + 1):
        engine.add_request(_prompt(pool, tokens, i), params)
        t0 = _now(engine.device)
        engine.step()
        times.append((_now(engine.device) - t0) * 1e3)
        while engine.has_work():
            engine.step()
    return statistics.median(times[1:])
