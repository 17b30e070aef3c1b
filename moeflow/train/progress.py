"""What a training run shows while it runs: a rich progress bar on a terminal, sparse lines else.

On a terminal: one live bar with step, loss, tokens/s and the dropped-token rate. When stdout
is not a terminal (CI, a log file) a bar would spam control codes, so a plain line is printed
every 10% of the run instead. Validation results and notes are always printed.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def step_summary(row: dict[str, Any]) -> str:
    text = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s  "
            f"dropped {100 * row['dropped_frac']:.1f}%")
    if "kd_loss" in row:
        text += f"  kd {row['kd_loss']:.4f}"
    return text


class ProgressReporter:
    def __init__(self, total: int, start: int, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.console = console or Console()
        self.total, self.enabled = total, enabled
        self.every = max(1, total // 10)
        self._bar = None
        if enabled and self.console.is_terminal:
            self._bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def step(self, step: int, row: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=step_summary(row))
        elif self.enabled and (step % self.every == 0 or step == self.total):
            self.console.print(f"step {step}/{self.total}  {step_summary(row)}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
