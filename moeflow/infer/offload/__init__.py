"""Serving MoE models larger than GPU memory: experts in host memory, a GPU expert cache sized
from a budget, copies on a side stream, and pre-gating that prefetches the next layer's experts.

Files, one concern each: config.py (OffloadConfig, the budget plan), expert_store.py (pinned host
copies), mapped_store.py (experts memory-mapped from the checkpoint's files, expert_store=
"mmap"), staged_copy.py (their chunked copy through two pinned buffers), expert_cache.py
(slots, eviction policy, pins), streams.py (copy stream and events, or no-ops on CPU),
prefetch.py (predictors and their hit rate), offloaded_experts.py (the experts module the
engine swaps in), placement.py (taking a model over under a budget).
"""

from moeflow.infer.offload.config import OffloadConfig, parse_size
from moeflow.infer.offload.expert_cache import CacheStats, ExpertCache
from moeflow.infer.offload.placement import OffloadStats, offload_experts
from moeflow.infer.offload.prefetch import PrefetchStats

__all__ = ["CacheStats", "ExpertCache", "OffloadConfig", "OffloadStats", "PrefetchStats",
           "offload_experts", "parse_size"]
