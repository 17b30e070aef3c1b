"""Inference: sampling, generation with a KV cache, and the serving engine."""

from moeflow.infer.engine import Engine, EngineConfig, EngineStats, TokenEvent
from moeflow.infer.generate import generate
from moeflow.infer.sampling import SamplingParams, sample_next

__all__ = ["Engine", "EngineConfig", "EngineStats", "SamplingParams", "TokenEvent", "generate",
           "sample_next"]
