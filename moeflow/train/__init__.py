"""Training: the run config, the loop, checkpoints, Mixture-of-Students distillation, metrics."""

from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer"]
