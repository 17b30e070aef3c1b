"""What a reproduction shows while it runs: a bar per stage and one for the whole run, with ETA.

The overall bar counts training FLOPs (each stage's steps weighted by its model's FLOPs per step,
a student's teacher forward included while it distils), so its ETA does not jump when a small
model is followed by a large one. On a terminal both bars are live; otherwise (CI, a log file)
a line is printed when a stage starts and ends and at every quarter of a stage (also with
`enabled=False`, which only turns the live bars off).
The trainer reports through `stage_reporter`, which has its ProgressReporter's three methods.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from moeflow.model.flops import training_flops_per_token
from moeflow.reproduce.family import TEACHER, Stage
from moeflow.reproduce.scale import Scale
from moeflow.train.progress import step_summary


def stage_flops(stage: Stage, stages: dict[str, Stage], scale: Scale) -> float:
    """Training FLOPs of one stage (the teacher's forward passes included while distilling)."""
    per_token = training_flops_per_token(stage.model, scale.seq_len)
    if stage.kd is not None:
        share = scale.kd_stop_fraction if stage.kd == "staged" else 1.0
        per_token += share * training_flops_per_token(stages[TEACHER].model, scale.seq_len) / 3
    return per_token * scale.tokens_per_stage


class _StageReporter:
    def __init__(self, owner: "ReproduceProgress", stage: Stage) -> None:
        self.owner, self.stage = owner, stage
        self.flops_per_step = stage_flops(stage, owner.stages, owner.scale) / owner.scale.steps
        self.last_step: int | None = None
        owner.start_stage(stage)

    def step(self, step: int, row: dict[str, Any]) -> None:
        done = 1 if self.last_step is None else step - self.last_step
        self.last_step = step
        self.owner.advance(step, done * self.flops_per_step, row)

    def note(self, text: str) -> None:
        if text.startswith("resumed from"):
            self.owner.note(f"{self.stage.name}: {text}")

    def close(self) -> None:
        self.owner.end_stage()


class ReproduceProgress:
    def __init__(self, stages: dict[str, Stage], todo: list[str], scale: Scale,
                 enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console()
        if console is None and not self.console.is_terminal:
            self.console.width = 160  # log lines: one per event, not wrapped at 80
        self.stages, self.scale, self.enabled = stages, scale, enabled
        self.total = sum(stage_flops(stages[s], stages, scale) for s in todo) or 1.0
        self._bar = None
        self._stage_task = None
        self._stage: Stage | None = None
        self._quarter = 0
        self._stage_start = 0.0
        if enabled and self.console.is_terminal:
            self._bar = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
            self._all = self._bar.add_task("all stages (FLOPs %)", total=100, info="")
            self._bar.start()
        self._done_flops = 0.0

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    @contextmanager
    def task(self, description: str):
        start = time.perf_counter()
        self.note(f"{description} ...")
        yield
        self.note(f"{description}: done in {time.perf_counter() - start:.1f}s")

    def stage_reporter(self, stage: Stage) -> _StageReporter:
        return _StageReporter(self, stage)

    def start_stage(self, stage: Stage) -> None:
        self._stage, self._quarter = stage, 0
        self._stage_start = time.perf_counter()
        self.note(f"stage {stage.name}: {stage.description}")
        if self._bar is not None:
            self._stage_task = self._bar.add_task(stage.name, total=self.scale.steps, info="")

    def advance(self, step: int, flops: float, row: dict[str, Any]) -> None:
        self._done_flops += flops
        info = step_summary(row) + (f"  val {row['val_loss']:.3f}" if "val_loss" in row else "")
        if self._bar is not None:
            self._bar.update(self._stage_task, completed=step, info=info)
            self._bar.update(self._all, completed=min(100.0, 100 * self._done_flops / self.total))
        elif step * 4 >= (self._quarter + 1) * self.scale.steps:
            self._quarter = step * 4 // self.scale.steps
            self.note(f"  {self._stage.name} step {step}/{self.scale.steps}  {info}  "
                      f"(all stages {100 * self._done_flops / self.total:.0f}%)")

    def end_stage(self) -> None:
        if self._bar is not None and self._stage_task is not None:
            self._bar.remove_task(self._stage_task)
            self._stage_task = None
        if self._stage is not None:
            self.note(f"stage {self._stage.name}: {time.perf_counter() - self._stage_start:.0f}s")
            self._stage = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
