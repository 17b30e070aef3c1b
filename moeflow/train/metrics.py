"""Metrics as JSON lines: OUT/metrics.jsonl, one object per step, flushed as it is written.

A step's object has step, tokens, loss (LM cross-entropy), lr, aux_loss, dropped_frac,
tokens_per_s, grad_norm (+ kd_loss while distilling); at validation points also val_loss,
val_ppl, moe_layers and expert_load (assignments per expert, one list per MoE layer). A model
with expert groups adds group_assignments and group_dropped_frac ({group: value}, summed over
MoE layers) to every step and expert_groups to validation rows (moeflow.train.group_stats).
Step 0 is the validation before training. A resumed run first drops rows after its checkpoint's
step (and a last row cut short by a kill), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line cut short (no newline: the process was killed
    while writing it) is dropped; any other line that is not a row is an error naming it."""
    text = Path(path).read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if number == len(lines):  # the unterminated last line
                break
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise ValueError(f"{path}: line {number} is not a metrics row (an object with an "
                             f"integer step)")
        rows.append(row)
    return rows


class MetricsWriter:
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self._kept: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            self._kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self._kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def last_validation(self) -> tuple[int, float] | None:
        """(step, val_loss) of the last validation kept from before a resume, if any."""
        vals = [(r["step"], r["val_loss"]) for r in self._kept if "val_loss" in r]
        return vals[-1] if vals else None

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
