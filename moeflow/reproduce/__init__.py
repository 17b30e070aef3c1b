"""`moeflow reproduce`: the DeepSpeed-MoE paper's claims, measured at small scale."""

from moeflow.reproduce.runner import ReproduceInterrupted, ReproduceOptions, reproduce

__all__ = ["ReproduceInterrupted", "ReproduceOptions", "reproduce"]
