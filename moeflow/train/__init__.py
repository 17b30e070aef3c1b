"""Training: the run config, the loop, checkpoints, Mixture-of-Students distillation, metrics.

The loop (moeflow.train.trainer) is imported on first use: it pulls in the checkpoint format and
with it torch.distributed.checkpoint (~0.7 s), which commands that only need the run config —
`moeflow info`, argument parsing, a refused flag — should not wait for."""

from moeflow.train.run_config import TrainConfig

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer"]


def __getattr__(name: str):
    if name in ("NonFiniteLossError", "TrainResult", "Trainer"):
        from moeflow.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'moeflow.train' has no attribute {name!r}")
