"""Running the engine's decode step eagerly or as replayed CUDA graphs.

A decode step of a MoE model is hundreds of small kernels (norms, rope, routing, dispatch, two
expert kernels, combine, per layer); at batch 1 launching them from Python costs more than the
GPU needs to stream the weights. Capturing the step once and replaying it removes the launch
cost. Graphs need static shapes and addresses, so:

- inputs live in one static device buffer (tokens, cached lengths, a real-row mask), refreshed
  by a single host-to-device copy per step;
- the batch is padded up to a bucket (powers of two up to the slot count); padded rows decode a
  dummy token into free cache slots (running sequences always occupy slots 0..B-1) and are masked
  out of the expert counts;
- keys are read up to a bucketed length S (powers of two, at least `MIN_KV_LEN`), masked past
  each sequence's own length;
- one graph per (batch bucket, S bucket), captured on first use after a warm-up run on a side
  stream (Triton autotuning and lazy initialisation must happen outside capture), all sharing one
  memory pool since they never run concurrently.

Both runners call the same `step_fn(tokens_B1, lengths_B, valid_B, kv_len) -> (logits_BV,
counts)`, so CPU tests exercise the exact computation the graphs capture; `GraphDecoder` with
capture=False runs the padded, bucketed step without graphs (CPU tests of the padding). A model
with a lookahead router (moeflow.model.lookahead) also needs each row's `history` (the tokens
before its input): `history_BH=` is then passed too, from H more rows of the same buffer.
"""

from __future__ import annotations

from typing import Callable

import torch

MIN_KV_LEN = 128

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int],
                  tuple[torch.Tensor, torch.Tensor]]


class EagerDecoder:
    """Runs the step as is: batch and key length exactly as needed."""

    def __init__(self, step_fn: StepFn, device: torch.device) -> None:
        self.step_fn, self.device = step_fn, device

    def __call__(self, tokens: list[int], lengths: list[int], groups: list[int] | None = None,
                 history: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`groups`: each row's expert group (models with expert groups, which decode eagerly:
        the router reads each group's token count on the host, which capture forbids);
        `history`: each row's tokens before its input (lookahead models)."""
        rows = [tokens, lengths, [1] * len(tokens)] + ([groups] if groups is not None else [])
        H = 0 if history is None else len(history[0])
        rows += [list(col) for col in zip(*history)] if H else []
        inputs = torch.tensor(rows, dtype=torch.int64).to(self.device)
        extra = {} if groups is None else {"groups_B1": inputs[3, :, None]}
        if history is not None:
            extra["history_BH"] = inputs[len(rows) - H:].t()
        return self.step_fn(inputs[0, :, None], inputs[1], inputs[2], max(lengths) + 1, **extra)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class GraphDecoder:
    """Replays one captured CUDA graph per (batch bucket, key-length bucket)."""

    def __init__(self, step_fn: StepFn, num_slots: int, max_len: int,
                 device: torch.device, capture: bool = True, history: int | None = None) -> None:
        """`history`: H, the tokens before each row's input that step_fn takes (None: none)."""
        self.step_fn, self.num_slots, self.max_len = step_fn, num_slots, max_len
        self.capture, self.history = capture, history
        rows = 3 + (history or 0)
        self.static = torch.zeros(rows, num_slots, dtype=torch.int64, device=device)
        self.host = torch.zeros(rows, num_slots, dtype=torch.int64,
                                pin_memory=torch.device(device).type == "cuda")
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.last_key: tuple[int, int] | None = None  # (batch, key-length) bucket of the last step
        self.pool = None

    def buckets(self, n: int, kv_needed: int) -> tuple[int, int]:
        return (min(_pow2_at_least(n), self.num_slots),
                min(max(_pow2_at_least(kv_needed), MIN_KV_LEN), self.max_len))

    def __call__(self, tokens: list[int], lengths: list[int], groups: list[int] | None = None,
                 history: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if groups is not None:
            raise ValueError("GraphDecoder: models with expert groups decode eagerly")
        n = len(tokens)
        B, S = self.buckets(n, max(lengths) + 1)
        self.last_key = (B, S)
        self.host.zero_()
        rows = [tokens, lengths, [1] * n]
        if self.history:
            rows += [list(col) for col in zip(*history)]
        self.host[:, :n] = torch.tensor(rows, dtype=torch.int64)
        self.static.copy_(self.host, non_blocking=True)
        if not self.capture:
            logits_BV, counts = self.step_fn(*self._args(B, S))
            return logits_BV[:n], counts
        if (B, S) not in self.graphs:
            self.graphs[B, S] = self._capture(B, S)
        graph, (logits_BV, counts) = self.graphs[B, S]
        graph.replay()
        return logits_BV[:n], counts

    def _args(self, B: int, S: int) -> tuple:
        args = (self.static[0, :B, None], self.static[1, :B], self.static[2, :B], S)
        if self.history is not None:  # padded rows: history 0, a real token (masked out anyway)
            args += (None, self.static[3:, :B].t())
        return args

    def _capture(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, tuple]:
        graph, outputs = capture_graph(self.step_fn, self._args(B, S), self.pool)
        self.pool = graph.pool()
        return graph, outputs


def capture_graph(fn: Callable, args: tuple, pool) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """`fn(*args)` captured into `pool` (None: a new one), after two warm-up runs on a side
    stream: Triton autotuning, torch.compile and lazy initialisation must happen outside
    capture. The warm-ups' writes (KV cache) are the ones the replays repeat."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(*args)
    return graph, outputs
