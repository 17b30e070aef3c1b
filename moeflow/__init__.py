"""moeflow: train and serve Mixture-of-Experts language models (DeepSpeed-MoE, independently)."""

from moeflow.config import FFNSpec, ModelConfig, RouterConfig
from moeflow.model import KVCache, ModelOutput, Transformer, parameter_counts
from moeflow.presets import PRESETS, preset

__version__ = "0.1.0"

__all__ = ["FFNSpec", "KVCache", "ModelConfig", "ModelOutput", "PRESETS", "RouterConfig",
           "Transformer", "parameter_counts", "preset"]
