"""moeflow's one checkpoint format: safetensors weights with a JSON manifest, written and read
through torch.distributed.checkpoint at any expert/data-parallel layout (see model_dir.py).

The readers and writers are imported on first use: they import torch.distributed.checkpoint
(~0.7 s), which modules that only need the chunk geometry (moeflow.checkpoint.chunks, used by
tensor slicing) or the error type should not pay for at start-up."""

from moeflow.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError", "load_model", "load_weights", "write_weights"]


def __getattr__(name: str):
    if name in ("load_model", "load_weights", "write_weights"):
        from moeflow.checkpoint import model_dir

        return getattr(model_dir, name)
    raise AttributeError(f"module 'moeflow.checkpoint' has no attribute {name!r}")
