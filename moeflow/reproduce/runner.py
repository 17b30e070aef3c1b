"""`moeflow reproduce`: the DeepSpeed-MoE paper's claims at small scale, in one command.

    moeflow reproduce --out runs/repro                  # the gpu scale: one H200, ~8 minutes
    moeflow reproduce --out runs/repro --resume         # continue after an interruption
    moeflow reproduce --out runs/repro --resume --only moe-S   # retrain one stage
    moeflow reproduce --out /tmp/smoke --scale smoke    # every stage for a few steps, on a CPU

Stages (moeflow.reproduce.family) are normal training runs: each has its own run directory with
run.json, metrics.jsonl and checkpoints, made by moeflow.train.Trainer from the stage's model
config and the scale's shared schedule, on one prepared dataset, so any stage can be rerun by
hand with `moeflow train --config DIR/configs/STAGE.json --data DIR/data ...`. After training,
every model is evaluated once more on a larger validation set and served through the engine to
time decoding and prefill; then the report (moeflow.reproduce.report) is written.

DIR:
  reproduce.json        the manifest: scale, data, each stage's status, training time and
                        measurements (final evaluation, serving latency)
  data/                 the prepared dataset (moeflow.data.prepared)
  configs/STAGE.json    each stage's ModelConfig
  runs/STAGE/           the stage's run directory
  report.md, report.json, loss.png, expert_load.png

Interruptions: SIGINT/SIGTERM stop the stage in flight at a step boundary with a checkpoint
(moeflow.train.interrupt); `--resume` skips finished stages and continues that one. A stage
counts as finished once its run reached its last step; its measurements are redone only when
it is retrained.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.data.prepared import DataSpec, is_prepared, prepare_dataset
from moeflow.reproduce.family import STAGES, TEACHER, Stage, build_stages
from moeflow.reproduce.measure import measure_stage
from moeflow.reproduce.progress import ReproduceProgress
from moeflow.reproduce.report import write_report
from moeflow.reproduce.scale import Scale, get_scale
from moeflow.train import checkpoint as ckpt_io
from moeflow.train.metrics import read_metrics
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer

MANIFEST = "reproduce.json"
DATA_DIR = "data"  # OUT/data: the prepared dataset
FORMAT = 1


class ReproduceInterrupted(Exception):
    """A signal stopped a stage; its checkpoint is saved and --resume continues."""


@dataclass(frozen=True)
class ReproduceOptions:
    out: str
    scale: str | None = None  # None: the manifest's when resuming, else "gpu"
    only: tuple[str, ...] = ()
    resume: bool = False
    data: tuple[str, ...] = ()  # the user's text instead of the built-in corpus
    device: str = "auto"
    progress: bool = True
    command: str = ""  # recorded in the manifest and the report

    def __post_init__(self) -> None:
        unknown = [name for name in self.only if name not in STAGES]
        if unknown:
            raise ValueError(f"--only: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: must be auto, cpu or cuda")


class _Context:
    def __init__(self, out: Path, scale: Scale, data: tuple[str, ...], device: str) -> None:
        self.out, self.scale, self.device = out, scale, device
        self.data_spec = scale.data if not data else DataSpec(
            source=data, vocab_size=scale.data.vocab_size, val_fraction=scale.data.val_fraction,
            tokenizer_sample_bytes=scale.data.tokenizer_sample_bytes)
        self.stages = build_stages(scale)

    @property
    def data_dir(self) -> Path:
        return self.out / DATA_DIR

    def run_dir(self, stage: str) -> Path:
        return self.out / "runs" / stage

    def config_path(self, stage: str) -> Path:
        return self.out / "configs" / f"{stage}.json"


# ---- the manifest ----------------------------------------------------------------------------

def _load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: reproduction format {manifest.get('format')!r}; this moeflow "
                         f"reads format {FORMAT}")
    return manifest


def _save_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def _existing(opts: ReproduceOptions) -> dict | None:
    """The manifest to resume, or None for a new reproduction; refuses what cannot work
    before anything is written."""
    out = Path(opts.out)
    if opts.resume:
        if not (out / MANIFEST).is_file():
            raise ValueError(f"--resume: {opts.out!r} holds no reproduction ({MANIFEST} missing)")
        return _load_manifest(out)
    if (out / MANIFEST).is_file():
        raise ValueError(f"--out {opts.out!r} already holds a reproduction; pass --resume to "
                         f"continue it (with --only STAGE to retrain a stage)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {opts.out!r} holds other files; choose a new or empty directory")
    return None


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None


def _resolve_device(requested: str, scale: Scale) -> str:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is available")
    device = "cuda" if requested == "cuda" or (requested == "auto" and cuda) else "cpu"
    if scale.name == "gpu" and device != "cuda":
        raise ValueError(f"the gpu scale needs a CUDA GPU (it trains {len(STAGES)} models on "
                         f"{scale.tokens_per_stage / 1e6:.0f} M tokens each); on a CPU run "
                         f"--scale smoke")
    return device


def _stages_to_run(opts: ReproduceOptions, manifest: dict, ctx: _Context) -> list[str]:
    status = manifest["stages"]
    if opts.only:
        todo = [s for s in STAGES if s in opts.only]
    else:
        todo = [s for s in STAGES if status.get(s, {}).get("status") != "done"]
    for name in todo:
        if ctx.stages[name].teacher and ctx.stages[name].teacher not in todo \
                and status.get(TEACHER, {}).get("status") != "done":
            raise ValueError(f"stage {name} distils {TEACHER}, which is not trained yet; "
                             f"add it to --only")
    return todo


# ---- one stage -------------------------------------------------------------------------------

def train_config(ctx: _Context, stage: Stage, resume: bool) -> TrainConfig:
    sc = ctx.scale
    kd = {}
    if stage.kd is not None:
        kd = dict(teacher=str(ctx.run_dir(TEACHER)), kd_alpha=sc.kd_alpha,
                  kd_temperature=sc.kd_temperature, student_init="random",
                  kd_stop_step=round(sc.steps * sc.kd_stop_fraction) if stage.kd == "staged"
                  else None)
    return TrainConfig(
        model_config=str(ctx.config_path(stage.name)), data=(str(ctx.data_dir),),
        seq_len=sc.seq_len, steps=sc.steps, batch_size=sc.batch_size, micro_batch=sc.micro_batch,
        lr=sc.lr, warmup_steps=sc.warmup_steps, min_lr_ratio=sc.min_lr_ratio, seed=sc.seed,
        val_every=sc.val_every, val_batches=sc.val_batches, out=str(ctx.run_dir(stage.name)),
        save_every=max(1, sc.steps // 4), keep_checkpoints=1, resume=resume,
        device=ctx.device, progress=False, **kd)


def train_seconds(run_dir: Path) -> float:
    """Seconds spent in training steps (validation and checkpoints excluded), from the run's
    per-step throughput: comparable across stages and unchanged by interruptions."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("tokens_per_s")]
    tokens = [r["tokens"] for r in rows]
    steps = [b - a for a, b in zip([0] + tokens[:-1], tokens)]
    return sum(n / r["tokens_per_s"] for n, r in zip(steps, rows))


def _train_stage(ctx: _Context, stage: Stage, entry: dict, rerun: bool,
                 progress: ReproduceProgress) -> None:
    """Train (or continue) one stage; `entry` is its manifest entry, updated in place, with the
    wall time summed over every invocation that trained it."""
    run_dir = ctx.run_dir(stage.name)
    if rerun and run_dir.exists():
        shutil.rmtree(run_dir)
    resume = run_dir.is_dir() and ckpt_io.latest_checkpoint(run_dir) is not None
    if run_dir.exists() and not resume:  # stopped before its first checkpoint: start over
        shutil.rmtree(run_dir)
    if not resume:
        entry.clear()
    entry["status"] = "training"
    trainer = Trainer(train_config(ctx, stage, resume), reporter=progress.stage_reporter(stage))
    start = time.perf_counter()
    try:
        result = trainer.run()
    finally:
        entry["wall_seconds"] = round(entry.get("wall_seconds", 0.0)
                                      + time.perf_counter() - start, 2)
    if result.interrupted_by:
        raise ReproduceInterrupted(f"{result.interrupted_by} during {stage.name} (step "
                                   f"{result.step}); continue with --resume")
    entry.update(status="done", train_seconds=round(train_seconds(run_dir), 3))


# ---- the whole reproduction -----------------------------------------------------------------

def reproduce(opts: ReproduceOptions, console=None) -> Path:
    """Run the reproduction described by `opts`; returns the report's path."""
    out, manifest = Path(opts.out), _existing(opts)
    if manifest is not None:
        if opts.scale is not None and opts.scale != manifest["scale"]:
            raise ValueError(f"--scale {opts.scale}: {opts.out!r} holds a {manifest['scale']} "
                             f"reproduction")
        if opts.data and tuple(opts.data) != tuple(manifest["data"]):
            if is_prepared(out / DATA_DIR) or manifest["stages"]:
                raise ValueError(f"--data differs from the reproduction's ({manifest['data']})")
            manifest["data"] = list(opts.data)  # its data never got prepared: take the new
        scale = get_scale(manifest["scale"])
        data = tuple(manifest["data"])
    else:
        scale = get_scale(opts.scale or "gpu")
        data = tuple(opts.data)
        manifest = {"format": FORMAT, "scale": scale.name, "data": list(data),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commands": [],
                    "stages": {}}
    device = _resolve_device(opts.device, scale)
    ctx = _Context(out, scale, data, device)
    todo = _stages_to_run(opts, manifest, ctx)
    _make_out(out)
    if opts.command:
        manifest["commands"].append(opts.command)
    _save_manifest(out, manifest)

    progress = ReproduceProgress(ctx.stages, todo, scale, enabled=opts.progress, console=console)
    try:
        if not is_prepared(ctx.data_dir):
            shutil.rmtree(ctx.data_dir, ignore_errors=True)
            with progress.task("preparing data"):
                prepare_dataset(ctx.data_spec, ctx.data_dir, log=progress.note)
        (out / "configs").mkdir(exist_ok=True)
        for name, stage in ctx.stages.items():
            stage.model.save(ctx.config_path(name))
        for name in todo:
            entry = manifest["stages"].setdefault(name, {})
            rerun = bool(opts.only) and entry.get("status") == "done"
            _save_manifest(out, {**manifest, "stages": {**manifest["stages"],
                                                        name: {**entry, "status": "training"}}})
            try:
                _train_stage(ctx, ctx.stages[name], entry, rerun, progress)
            finally:
                _save_manifest(out, manifest)
            if name == TEACHER and rerun:
                progress.note(f"{TEACHER} was retrained: the mos-S stages still hold students of "
                              f"the previous teacher until they are retrained too")
        for name in STAGES:
            entry = manifest["stages"].get(name, {})
            if entry.get("status") == "done" and (name in todo or "measure" not in entry):
                start = time.perf_counter()
                with progress.task(f"measuring {name}"):
                    entry["measure"] = measure_stage(ctx.run_dir(name), ctx.data_dir, scale,
                                                     device)
                entry["measure"]["seconds"] = round(time.perf_counter() - start, 2)
                _save_manifest(out, manifest)
    finally:
        progress.close()
    return write_report(out, manifest, scale, ctx.stages)
