"""What the engine takes and gives: its configuration (EngineConfig), the events step() returns
(TokenEvent) and its counters (EngineStats); the engine itself is moeflow.infer.engine."""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.infer.offload.config import OffloadConfig
from moeflow.infer.offload.placement import OffloadStats
from moeflow.infer.scheduler import BATCHING
from moeflow.validate import check, choice, integer


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # running sequences per step (= cache slots unless cache_tokens caps)
    max_seq_len: int | None = None  # prompt + generated tokens; default model.config.max_seq_len
    cache_tokens: int | None = None  # KV tokens, all sequences; default max_batch_size*max_seq_len
    cuda_graphs: bool = True  # capture decode steps on CUDA (if capturable); ignored on CPU
    # Also capture prefills (one graph per prompt-length bucket, moeflow.infer.prefill_graphs)
    # where decode is captured; prompts longer than prefill_graph_tokens (or the slot) run eagerly.
    prefill_graphs: bool = True
    prefill_graph_tokens: int = 4096
    # Keep experts in host memory under a GPU-memory budget (moeflow.infer.offload); the engine
    # then places the model itself: load it on the CPU. Decode runs eagerly (no CUDA graphs).
    offload: OffloadConfig | None = None
    # Admission order of waiting requests (moeflow.infer.scheduler): "fifo" or "expert-aware"
    # (needs a model with a lookahead router); the latter looks at the oldest batching_window
    # waiting requests and admits any that waited batching_max_wait steps first.
    batching: str = "fifo"
    batching_window: int = 16
    batching_max_wait: int = 8
    # Launch each decode step before reading the previous one's tokens (module docstring,
    # "pipelined decode"); False: one step at a time, each step's events from its own call.
    pipelined_decode: bool = True

    def __post_init__(self) -> None:
        if self.offload is not None and not isinstance(self.offload, OffloadConfig):
            raise ValueError(f"offload={self.offload!r}: expected an OffloadConfig or None")
        choice("batching", self.batching, BATCHING)
        integer("batching_window", self.batching_window, lo=1)
        integer("batching_max_wait", self.batching_max_wait, lo=0)
        integer("max_batch_size", self.max_batch_size, lo=1)
        integer("max_seq_len", self.max_seq_len, lo=1, optional=True)
        integer("cache_tokens", self.cache_tokens, lo=1, optional=True)
        integer("prefill_graph_tokens", self.prefill_graph_tokens, lo=1)
        check(isinstance(self.pipelined_decode, bool), "pipelined_decode", self.pipelined_decode,
              "must be True or False")


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int | None  # None only for an abort event
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    cache_used: int  # tokens held by running requests
    cache_capacity: int  # slots * max_seq_len
    tokens_generated: int  # cumulative
    # Cumulative per MoE layer, per expert: the assignments the engine computed, so with
    # pipelined decode also the row of a request that finished while its batch-mates ran on
    # (computed, its token dropped).
    expert_counts: tuple[tuple[int, ...], ...]
    offload: OffloadStats | None = None  # expert cache and prefetch statistics, if offloading
    expert_groups: tuple[tuple[str, int], ...] = ()  # the model's ((name, experts), ...)
    group_tokens: tuple[int, ...] = ()  # cumulative tokens processed (prompt + decode) per group
