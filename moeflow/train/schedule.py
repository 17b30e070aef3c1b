"""Learning rate: linear warmup, then cosine decay to min_lr_ratio × lr at the last step.

A pure function of the step, so the "scheduler state" in a checkpoint is just the step number
and a resumed run computes bit-identical rates.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
