"""How a run trains a model: the frozen, validated run configuration (the model is ModelConfig).

Every `moeflow train` flag is one field here; the CLI builds its flags from these fields and
their `help` metadata, so there is no second list of options to keep in step.

A run writes its config to OUT/run.json (rewritten by each `--resume` with what that
invocation ran). `resume_config` builds a continuation from it, so `--resume` needs no other
flag: a flag given again must agree with the run's value or the resume is refused, naming it;
fields in RESUMABLE (bookkeeping) may change; `--stop-at` applies to one invocation only; and
`--steps N` may grow, which extends the run (even a finished one) with the lr schedule that
moeflow.train.schedule describes. `--preset`/`--config` given again are checked by content:
the network they describe must be the checkpoint's (a config file may have moved).

Batch sizes are global: `batch_size` windows per optimizer step over all ranks; `micro_batch`
is what one rank runs per forward pass, and gradient accumulation makes up the rest
(accum = batch_size / (micro_batch × world)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
STUDENT_INITS = ("teacher", "random")
# Fields a resumed run may set differently from the run it continues.
RESUMABLE = ("stop_at", "resume", "save_every", "keep_checkpoints", "out", "device", "progress")
# Checked against the checkpoint's network rather than by value (see the module docstring).
MODEL_FIELDS = ("preset", "model_config")
# Fields naming files: compared as absolute paths ("builtin:" sources are names, not paths).
PATH_FIELDS = ("data", "teacher")


def _opt(help: str, flag: str | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    return field(metadata=meta, **kw)


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str = _opt("model preset to train (see `moeflow info`)", default="tiny")
    model_config: str | None = _opt("model config file (.json/.yaml) instead of --preset",
                                    flag="--config", default=None)
    data: tuple[str, ...] = _opt(
        "text files, directories of them, or JSONL files; default: the source files of the "
        "running Python's standard library (no download)", default=())
    text_field: str = _opt("JSONL field holding the text", default="text")
    vocab_size: int | None = _opt("BPE vocabulary size (default: the model's)", default=None)
    val_fraction: float = _opt("fraction of documents held out for validation", default=0.05)
    seq_len: int | None = _opt("tokens per training sequence (default: the model's max_seq_len)",
                               default=None)
    # the schedule
    steps: int = _opt(
        "total optimizer steps: the length of the lr schedule. With --resume, a larger N "
        "extends the run, finished or not: from its next step the lr falls by a half cosine "
        "from its current value to the floor (min_lr_ratio × lr) at step N, so a finished "
        "run trains on at the floor (moeflow/train/schedule.py)", default=1000)
    batch_size: int = _opt("global batch: sequences per optimizer step over all ranks",
                           default=16)
    micro_batch: int | None = _opt("sequences per forward pass on one rank (default: all of the "
                                   "rank's share, no accumulation)", default=None)
    lr: float = _opt("peak learning rate", default=1e-3)
    warmup_steps: int | None = _opt("linear warmup steps (default: min(100, steps/10))",
                                    default=None)
    min_lr_ratio: float = _opt("cosine decay floor as a fraction of --lr", default=0.1)
    weight_decay: float = _opt("AdamW weight decay (matrices only)", default=0.1)
    beta1: float = _opt("AdamW beta1", default=0.9)
    beta2: float = _opt("AdamW beta2", default=0.95)
    grad_clip: float = _opt("clip the global gradient norm to this (0 = off)", default=1.0)
    aux_loss_coef: float | None = _opt("load-balancing loss coefficient (default: the model's)",
                                       default=None)
    seed: int = _opt("seeds weights, data order and every RNG", default=0)
    # bookkeeping
    out: str = _opt("run directory: metrics.jsonl, checkpoints/", default="runs/train")
    save_every: int = _opt("checkpoint every N steps (0 = only at the end)", default=0)
    keep_checkpoints: int = _opt("checkpoints kept on disk (older ones are deleted)", default=2)
    stop_at: int | None = _opt("end the run after step K as an interruption would, leaving a "
                               "checkpoint that --resume continues on the same schedule",
                               default=None)
    resume: bool = _opt("continue the run in --out from its latest checkpoint", default=False)
    val_every: int = _opt("validate every N steps (and before the first and after the last)",
                          default=100)
    val_batches: int = _opt("validation micro-batches per validation point", default=8)
    device: str = _opt("auto (CUDA if available), cpu or cuda", default="auto")
    progress: bool = _opt("show a progress bar (a line every 10%% when not a terminal)",
                          default=True)
    # Mixture-of-Students distillation
    teacher: str | None = _opt("teacher checkpoint (run dir or checkpoint dir): distil it into "
                               "this model", default=None)
    kd_alpha: float = _opt("weight of the distillation term", default=0.5)
    kd_temperature: float = _opt("softmax temperature of the soft labels", default=1.0)
    kd_stop_step: int | None = _opt("staged KD: steps from this one on train without the "
                                    "distillation term (default: distil throughout)",
                                    default=None)
    student_init: str = _opt("with --teacher: 'teacher' copies matching teacher layers into the "
                             "student, 'random' starts from scratch", default="teacher")

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, str)):
            object.__setattr__(self, "data", tuple([self.data] if isinstance(self.data, str)
                                                   else self.data))
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", min(100, self.steps // 10))
        _positive_int(self, "steps", "batch_size", "val_every", "val_batches", "keep_checkpoints")
        _nonneg_int(self, "save_every", "warmup_steps", "seed")
        for name in ("micro_batch", "vocab_size", "seq_len"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            _fail("micro_batch", self.micro_batch,
                  f"must divide batch_size={self.batch_size}")
        if self.warmup_steps > self.steps:
            _fail("warmup_steps", self.warmup_steps, f"must be <= steps={self.steps}")
        if self.stop_at is not None:
            if not (isinstance(self.stop_at, int) and 1 <= self.stop_at <= self.steps):
                _fail("stop_at", self.stop_at, f"must be in [1, steps={self.steps}]")
        _number(self, "lr", lo=0, lo_open=True)
        _number(self, "min_lr_ratio", lo=0, hi=1)
        _number(self, "weight_decay", lo=0)
        _number(self, "beta1", lo=0, hi=1, hi_open=True)
        _number(self, "beta2", lo=0, hi=1, hi_open=True)
        _number(self, "grad_clip", lo=0)
        _number(self, "val_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        if self.aux_loss_coef is not None:
            _number(self, "aux_loss_coef", lo=0)
        _number(self, "kd_alpha", lo=0)
        _number(self, "kd_temperature", lo=0, lo_open=True)
        if self.kd_stop_step is not None:
            _nonneg_int(self, "kd_stop_step")
        if self.device not in DEVICES:
            _fail("device", self.device, f"must be one of {', '.join(DEVICES)}")
        if self.student_init not in STUDENT_INITS:
            _fail("student_init", self.student_init, f"must be one of {', '.join(STUDENT_INITS)}")
        if not self.out:
            _fail("out", self.out, "must name a directory")

    @property
    def distilling(self) -> bool:
        return self.teacher is not None

    def kd_active(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based, as in metrics.jsonl) uses the distillation
        term: staged KD switches it off from step kd_stop_step on."""
        return self.distilling and (self.kd_stop_step is None or step < self.kd_stop_step)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run config field {unknown[0]!r}")
        return cls(**{**data, "data": tuple(data.get("data", ()))})

    def save(self, path: str | Path) -> None:
        """Write atomically: a resume rewrites OUT/run.json, and a kill must not truncate it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a run.json; any problem is a one-line ValueError naming the file."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def differences(self, other: "TrainConfig") -> list[str]:
        """Fields (outside RESUMABLE and `steps`, which a resume may raise) on which `self` and
        `other` disagree, in field order."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in RESUMABLE + ("steps",)
                and getattr(self, f.name) != getattr(other, f.name)]


def resume_config(given: dict[str, Any]) -> TrainConfig:
    """The config that continues the run in given["out"] (or the default --out): the run's
    OUT/run.json with the fields in `given` (the flags on the command line) applied.

    ValueError naming the field when a given value contradicts the run, when `steps` is
    smaller than the run's, or when OUT holds no run.
    """
    out = Path(given.get("out", TrainConfig.out))
    path = out / "run.json"
    if not path.is_file():
        from moeflow.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume")
        path = ckpt / "run.json"
    saved = TrainConfig.load(path)
    changes: dict[str, Any] = {"stop_at": None, "resume": True, "out": str(out)}
    for name, value in given.items():
        if isinstance(value, list):
            value = tuple(value)
        have = getattr(saved, name)
        if name in RESUMABLE or name in MODEL_FIELDS:
            changes[name] = value
        elif name == "steps" and isinstance(value, int) and value >= saved.steps:
            changes[name] = value
        elif _normalised(name, value) != _normalised(name, have):
            hint = ("; --steps can only grow (extend the run)" if name == "steps" else
                    f"; leave the flag out to continue with the run's {name}")
            raise ValueError(f"cannot resume {str(out)!r}: {name}={value!r} but the run used "
                             f"{name}={have!r}{hint}")
    if "preset" in given and "model_config" not in given:
        changes["model_config"] = None
    return saved.replace(**changes)


def _normalised(name: str, value: Any) -> Any:
    def path(p: Any) -> Any:
        return os.path.abspath(p) if isinstance(p, str) and not p.startswith("builtin:") else p

    if name not in PATH_FIELDS:
        return value
    return tuple(map(path, value)) if isinstance(value, tuple) else path(value)


def _fail(name: str, value: Any, need: str) -> None:
    raise ValueError(f"{name}={value!r}: {need}")


def _positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _fail(name, v, "must be an integer >= 1")


def _nonneg_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            _fail(name, v, "must be an integer >= 0")


def _number(cfg: TrainConfig, name: str, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}, "
        hi_s = "inf)" if hi is None else f"{hi}" + (")" if hi_open else "]")
        _fail(name, v, f"must be a finite number in {lo_s or '(-inf, '}{hi_s}")
