"""Checkpoints in and out: HF transformers configs and weights, moeflow's own layout."""

from moeflow.interop.convert import convert
from moeflow.interop.hf_config import HF_MODEL_TYPES, config_from_hf, config_to_hf
from moeflow.interop.pretrained import (ModelDir, find_model_dir, from_pretrained, read_config,
                                        save_hf, save_pretrained)

__all__ = ["HF_MODEL_TYPES", "ModelDir", "config_from_hf", "config_to_hf", "convert",
           "find_model_dir", "from_pretrained", "read_config", "save_hf", "save_pretrained"]
