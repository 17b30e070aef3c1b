"""moeflow: train and serve Mixture-of-Experts language models (DeepSpeed-MoE, independently)."""

from moeflow.config import PRESETS, FFNSpec, ModelConfig, RouterConfig
from moeflow.model import ModelOutput, Transformer, parameter_counts
from moeflow.ops.backend import Backends


def from_pretrained(path, dtype=None, device="cpu"):
    """Load a moeflow or HF MoE checkpoint directory (see moeflow.interop.from_pretrained)."""
    from moeflow.interop import from_pretrained as load

    return load(path, dtype=dtype, device=device)


__version__ = "0.1.0"

__all__ = ["Backends", "FFNSpec", "ModelConfig", "ModelOutput", "PRESETS",
           "RouterConfig", "Transformer", "from_pretrained", "parameter_counts"]
