"""Checkpoints in and out: HF transformers configs and weights, moeflow's own layout.

The names below load their module on first use: the readers and writers import the checkpoint
format and with it torch.distributed.checkpoint (~0.7 s), which the command line should not wait
for when it only needs a config dataclass (moeflow.interop.upcycle's, for its flags)."""

# `convert` (the function) is not among them: its module has the same name, and the package
# attribute is the module once anything imported it; use moeflow.interop.convert.convert.
_EXPORTS = {
    "HF_MODEL_TYPES": "hf_config", "config_from_hf": "hf_config", "config_to_hf": "hf_config",
    "ModelDir": "pretrained", "find_model_dir": "pretrained", "from_pretrained": "pretrained",
    "read_config": "pretrained", "save_hf": "pretrained", "save_pretrained": "pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeflow.interop' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"moeflow.interop.{_EXPORTS[name]}"), name)
