"""The engine's sampled draws replayed from CUDA graphs.

Why: a decode step replayed from its CUDA graph costs the host one launch, but the rows that
sample are drawn after it by the sampler's kernels (moeflow.infer.sampling.draw_on_kernels: a
top-k launch or four nucleus launches, then a draw, besides the output's copy), each launched
from Python. Where the host is slower than the GPU's step (a small model, or a busy host) those
launches set the pace of every sampled step.

How: a draw's launches are shaped by its KernelDraws (how many rows take a top-k and of what k,
how many draw from whole rows, and whether either group has a top-p) and by the addresses of
its tensors (the decode graph's logits and greedy tokens for its batch bucket, the tickets):
for a steady batch all of these repeat every step, and only the table's values change (each
row's draw key: its seed and position). A draw shaped like the one before it is captured
(after one eager run outside capture, on a side stream: Triton compiles and lazy set-up happen
there), and every later draw of that shape copies its table into the graph's own and replays
it. A batch whose mix of parameters changes every step is never captured (each draw runs
eagerly, as without graphs), so a capture's cost is paid only by a shape that has repeated.
Graphs are kept for the last MAX_GRAPHS shapes, all in one memory pool (they never run
concurrently), and are captured without torch.cuda.graph's device synchronisation and cache
release, which would stall the pipelined decode at every capture.

The tokens are those of the eager draw: the same kernels on the same inputs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from moeflow.infer.sampling import KernelDraws, draw_on_kernels

# The shapes whose graphs are kept (the least recently used goes first).
MAX_GRAPHS = 8


class SamplerGraphs:
    """Replays the engine's sampled draws from CUDA graphs, one per draw shape (the module's
    docstring); `captures` and `replays` count them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                              torch.Tensor]] = OrderedDict()
        self.pool = None
        self.captures = self.replays = 0
        self._last_key: tuple | None = None
        self._stream: torch.cuda.Stream | None = None

    def draw(self, logits_BV: torch.Tensor, draws: KernelDraws, host_S6: torch.Tensor,
             greedy_B: torch.Tensor, tickets: torch.Tensor | None) -> torch.Tensor:
        """draw_on_kernels(logits_BV, draws, the table host_S6 on the device, greedy_B,
        tickets), replayed where this shape was drawn last time too (the result is then the
        graph's output buffer, valid until its next replay)."""
        key = (draws, *(_address(t) for t in (logits_BV, greedy_B, tickets)))
        entry = self.graphs.get(key)
        repeated, self._last_key = key == self._last_key, key
        if entry is None and not repeated:
            return draw_on_kernels(logits_BV, draws,
                                   host_S6.to(self.device, non_blocking=True), greedy_B, tickets)
        if entry is None:
            entry = self.graphs[key] = self._capture(logits_BV, draws, host_S6, greedy_B,
                                                     tickets)
            self.captures += 1
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, table_S6, out_B = entry
        table_S6.copy_(host_S6, non_blocking=True)
        graph.replay()
        self.replays += 1
        return out_B

    def _capture(self, logits_BV: torch.Tensor, draws: KernelDraws,
                 host_S6: torch.Tensor, greedy_B: torch.Tensor, tickets: torch.Tensor | None
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        table_S6 = host_S6.to(self.device, non_blocking=True)  # the graph's own, outside its pool
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        args = (logits_BV, draws, table_S6, greedy_B, tickets)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            draw_on_kernels(*args)  # outside capture: compiles, lazy set-up
            graph.capture_begin(pool=self.pool)
            try:
                out_B = draw_on_kernels(*args)
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        self.pool = graph.pool()
        return graph, table_S6, out_B


def _address(t: torch.Tensor | None) -> tuple | None:
    """What a captured launch bakes in of a tensor: where it is and how it is laid out."""
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
