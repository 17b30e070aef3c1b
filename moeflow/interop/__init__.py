"""Checkpoints in and out: HF transformers configs and weights, moeflow's own layout."""

from moeflow.interop.hf_config import HF_MODEL_TYPES, config_from_hf, config_to_hf
from moeflow.interop.pretrained import (convert, from_pretrained, read_config, save_hf,
                                        save_pretrained)

__all__ = ["HF_MODEL_TYPES", "config_from_hf", "config_to_hf", "convert", "from_pretrained",
           "read_config", "save_hf", "save_pretrained"]
