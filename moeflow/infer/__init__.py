"""Inference: sampling, generation with a KV cache, and the serving engine."""

from moeflow.infer.generate import generate
from moeflow.infer.sampling import SamplingParams, sample_next

__all__ = ["SamplingParams", "generate", "sample_next"]
