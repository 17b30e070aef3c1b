"""Running the engine's prefill as replayed CUDA graphs, one per token-count bucket.

Why: a prefill forward of a 48-layer MoE model launches ~3500 kernels. At 2048 tokens of the
Qwen3-30B-A3B shape the host took ~26 ms more than the GPU needed to run them (an H100 and an
H200 both measured ~88 ms wall for ~62 ms of kernels, benchmarks/NOTES-infer.md): the prefill was
launch-bound. Replaying a captured graph launches the whole forward at once.

The forward has no host syncs on CUDA (routing and dispatch are Triton kernels, the experts run
torch._grouped_mm with device-side group offsets or the weight-streaming kernels, the KV write
takes its slot from a device tensor), so it can be captured; the engine uses this only where the
decode step is capturable too (moeflow.infer.engine.graph_capturable: no per-expert loop, no
expert groups, no offloading, one rank). Graphs need static shapes and addresses, so:

- a prompt of T tokens runs in the smallest bucket >= T (2^k and 3·2^(k-1), from 16 tokens up
  to `max_tokens`, which is at most the slot length): at most a third of a bucket is padding;
- the token ids, the real-row mask, the last real position and the slot live in one static
  device buffer, filled by one host-to-device copy per prefill;
- padding rows sit after every real token: causal attention keeps them out of the real rows,
  routing is per token (dropless), the logits are taken at the last real position only, and
  the expert counts mask them out. Their keys are written into the slot past the prompt, where
  decode never reads before overwriting (moeflow.infer.slot_cache.SlotPrefillView);
- a graph is captured at the first prompt of its bucket, after two warm-up runs on a side stream
  (Triton autotuning, torch.compile and lazy initialisation must happen outside capture). All
  prefill graphs share one memory pool, since they never run concurrently: its size is about the
  activation peak of one forward at the largest bucket used, not a sum over buckets.

Prompts longer than `max_tokens` run eagerly (the caller checks `fits`). `capture=False` runs the
padded, bucketed forward without graphs: CPU tests check the padding against the eager prefill.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeflow.infer.decode_graphs import capture_graph

MIN_BUCKET = 16

# (ids_1T, last_11, valid_T, slot_1) -> (logits_1V, expert counts)
PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]]


def prefill_buckets(max_tokens: int) -> list[int]:
    """16, 24, 32, 48, 64, ... (2^k and 3·2^(k-1)) below max_tokens, then max_tokens itself."""
    out, k = [], MIN_BUCKET
    while k < max_tokens:
        out += [b for b in (k, k * 3 // 2) if b < max_tokens]
        k *= 2
    return out + [max_tokens]


class GraphPrefiller:
    """Replays one captured CUDA graph per prompt-length bucket."""

    def __init__(self, prefill_fn: PrefillFn, max_tokens: int, device: torch.device,
                 capture: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: must be at least 1")
        self.prefill_fn, self.max_tokens, self.capture = prefill_fn, max_tokens, capture
        self.buckets = prefill_buckets(max_tokens)
        M = max_tokens
        # [ids (M) | real-row mask (M) | last real position | slot]
        self.static = torch.zeros(2 * M + 2, dtype=torch.int64, device=device)
        pinned = torch.device(device).type == "cuda"
        self.host = torch.zeros(2 * M + 2, dtype=torch.int64, pin_memory=pinned)
        # The pinned buffer may be refilled only after the previous copy from it has run.
        self.copied = torch.cuda.Event() if pinned else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.last_bucket: int | None = None
        self.pool = None

    def fits(self, num_tokens: int) -> bool:
        return 1 <= num_tokens <= self.max_tokens

    def bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def _args(self, Tb: int) -> tuple[torch.Tensor, ...]:
        M = self.max_tokens
        return (self.static[None, :Tb], self.static[2 * M:2 * M + 1].view(1, 1),
                self.static[M:M + Tb], self.static[2 * M + 1:])

    def __call__(self, slot: int, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T, M = len(prompt_ids), self.max_tokens
        if not self.fits(T):
            raise ValueError(f"GraphPrefiller: a prompt of {T} tokens is outside 1..{M}")
        Tb = self.bucket(T)
        self.last_bucket = Tb
        if self.copied is not None:
            self.copied.synchronize()
        self.host.zero_()
        self.host[:T] = torch.tensor(prompt_ids, dtype=torch.int64)
        self.host[M:M + T] = 1
        self.host[2 * M] = T - 1
        self.host[2 * M + 1] = slot
        self.static.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if not self.capture:
            return self.prefill_fn(*self._args(Tb))
        if Tb not in self.graphs:
            self.graphs[Tb] = self._capture(Tb)
        graph, outputs = self.graphs[Tb]
        graph.replay()
        return outputs

    def _capture(self, Tb: int) -> tuple[torch.cuda.CUDAGraph, tuple]:
        graph, outputs = capture_graph(self.prefill_fn, self._args(Tb), self.pool)
        self.pool = graph.pool()
        return graph, outputs
