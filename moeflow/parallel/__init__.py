"""Expert × data parallelism on torch.distributed: layout, token exchange, sharding, gradients.
See mesh.py for how ranks are laid out per MoE layer."""

from moeflow.parallel.dispatcher import AllToAllDispatcher
from moeflow.parallel.grads import ShardedOptimizer, clip_grad_norm_, reduce_gradients
from moeflow.parallel.launch import DistEnv, init_distributed
from moeflow.parallel.mesh import LayerLayout, ParallelConfig, ParallelLayout, ProcessGroups
from moeflow.parallel.shard import shard_model

__all__ = ["AllToAllDispatcher", "DistEnv", "LayerLayout", "ParallelConfig", "ParallelLayout",
           "ProcessGroups", "ShardedOptimizer", "clip_grad_norm_", "init_distributed",
           "reduce_gradients", "shard_model"]
