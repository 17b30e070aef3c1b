"""Learning rate: linear warmup, then cosine decay to min_lr_ratio × lr at the last step; a run
extended by `moeflow train --resume --steps N` decays again from where it stands.

A pure function of the step (and of the steps at which the run was extended), so the
"scheduler state" in a checkpoint is the step and the segments below, and a resumed run
computes bit-identical rates.

Extension. A run planned for T0 steps, resumed when its next step is s with `--steps T1`
(T1 > T0), keeps every rate it has already used; from step s' = max(s, warmup_steps) on, the
rate falls by a half cosine from the rate step s' had under the old plan, lr_old(s'), to the
same floor, min_lr_ratio × lr, reached at step T1:

    lr(t) = floor + (lr_old(s') - floor) · ½ (1 + cos(π · (t - s') / (T1 - s')))   for t ≥ s'

So an unfinished run continues without a jump and reaches the floor at T1 instead of T0 (an
extension during warmup is exactly the plain schedule of T1 steps), and a finished run, already
at the floor, trains its extra steps at the floor. The peak is never revisited: re-warming a
trained model costs a loss spike that the extension would first have to undo. Extending again
adds another segment, in the same way. Steps are 0-based here (step t is the (t+1)-th update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run planned for total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """Warmup-cosine over segments[0] = (0, T0); each later (s', T) is an extension from s'."""

    lr: float
    warmup_steps: int
    min_lr_ratio: float
    segments: tuple[tuple[int, int], ...]

    @classmethod
    def planned(cls, lr: float, warmup_steps: int, total_steps: int,
                min_lr_ratio: float) -> "LRSchedule":
        return cls(lr, warmup_steps, min_lr_ratio, ((0, total_steps),))

    @property
    def total_steps(self) -> int:
        return self.segments[-1][1]

    def at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        *earlier, (start, total) = self.segments
        if not earlier:
            return lr_at(step, self.lr, self.warmup_steps, total, self.min_lr_ratio)
        before = replace(self, segments=tuple(earlier))
        if step < start:
            return before.at(step)
        floor = self.lr * self.min_lr_ratio
        begin = before.at(start)
        progress = min((step - start) / (total - start), 1.0)
        return floor + (begin - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def extended(self, next_step: int, total_steps: int) -> "LRSchedule":
        """The schedule of a run whose next step (0-based) is `next_step`, now planned for
        `total_steps`; unchanged when the plan is."""
        if total_steps == self.total_steps:
            return self
        if total_steps < self.total_steps:
            raise ValueError(f"steps={total_steps}: a run planned for {self.total_steps} steps "
                             f"can be extended, not shortened")
        start = max(next_step, self.warmup_steps)
        kept = tuple(seg for seg in self.segments if seg[0] < start or seg[0] == 0)
        return replace(self, segments=kept + ((start, total_steps),))

    def state_dict(self) -> list[list[int]]:
        return [list(seg) for seg in self.segments]

    def with_segments(self, segments: list[list[int]]) -> "LRSchedule":
        return replace(self, segments=tuple((int(a), int(b)) for a, b in segments))
