"""moeflow's one checkpoint format: safetensors weights with a JSON manifest, written and read
through torch.distributed.checkpoint at any expert/data-parallel layout (see model_dir.py)."""

from moeflow.checkpoint.errors import CheckpointError
from moeflow.checkpoint.model_dir import load_model, load_weights, write_weights

__all__ = ["CheckpointError", "load_model", "load_weights", "write_weights"]
