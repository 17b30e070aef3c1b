"""Inference: sampling, the serving engine with its slot KV cache, and text through it."""

from moeflow.infer.engine import Engine, EngineConfig, EngineStats, TokenEvent
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.sampling import SamplingParams, sample_tokens
from moeflow.infer.text import generate_text

__all__ = ["Engine", "EngineConfig", "EngineStats", "OffloadConfig", "SamplingParams",
           "TokenEvent", "generate_text", "sample_tokens"]
