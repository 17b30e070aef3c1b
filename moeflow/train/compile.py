"""Regional compilation for training (`moeflow train --compile`): torch.compile on each block's
dense parts — the two norms, attention, and the MLP of dense layers — one module at a time.

Per module rather than the whole model: each compiled region is small (compiles in seconds, is
reused by every block of the same shape) and the MoE layers stay eager. They are left out
because their routing is data-dependent (token counts per expert change every step) and
torch._grouped_mm's compile-time check accepts only bf16 operands, so tracing them would
recompile or fail; their kernels are fused by hand already (moeflow.ops). `nn.Module.compile`
compiles in place, so parameter names, checkpoints and the optimizer are unchanged.
"""

from __future__ import annotations

from torch import nn

from moeflow.model.moe import MoELayer


def compile_dense_parts(model: nn.Module) -> int:
    """Compile every block's norms, attention and dense MLP in place; returns how many modules."""
    compiled = 0
    for block in model.blocks:
        parts = [block.attn_norm, block.attn, block.ffn_norm]
        if not isinstance(block.ffn, MoELayer):
            parts.append(block.ffn)
        for module in parts:
            module.compile(dynamic=False)
            compiled += 1
    return compiled
