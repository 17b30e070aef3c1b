"""A forecast run directory: what `moeflow forecast train` writes and `predict`/`eval` read.

  forecast.json       {"model": ForecastModelConfig, "train": ForecastTrainConfig,
                       "series": [{name, points, period, trained_on}], "finished": bool}
  model.safetensors   the weights
  metrics.jsonl       one row per logged step: step, loss, huber, pinball, aux_loss, lr,
                      expert_load (assignments per expert, one list per MoE layer)
  eval/               what `moeflow forecast eval` writes (eval.json, forecasts.png)

A missing or damaged file is a one-line ValueError naming it. No command writes into a
location that already holds something (check_out_dir): train and eval refuse an --out that is
not an empty directory, predict an --out that exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeflow.forecast.config import ForecastModelConfig, ForecastTrainConfig
from moeflow.forecast.model import TimeMoE

RUN_FILE = "forecast.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
EVAL_FILE = "eval.json"


def describe_contents(path: Path) -> str:
    """What a non-empty directory holds, for an error: its kind of run and its first names."""
    names = sorted(p.name for p in path.iterdir())
    if RUN_FILE in names:
        what = "a forecast run"
    elif "run.json" in names:
        what = "a training run"
    elif EVAL_FILE in names:
        what = "a forecast evaluation"
    else:
        what = "other files"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{what} ({shown})"


def check_out_dir(out: Path, default: bool = False) -> None:
    """Refuse an output directory that exists and is not empty (as `moeflow train` does):
    nothing a command writes may replace or mix with what is already there. `default`: the
    directory is the command's default, not a --out the user gave."""
    if not out.exists():
        return
    where = f"{str(out)!r} (the default --out)" if default else f"--out {str(out)!r}"
    if not out.is_dir():
        raise ValueError(f"{where} is an existing file; choose another --out")
    if any(out.iterdir()):
        raise ValueError(f"{where} already holds {describe_contents(out)}; choose another "
                         f"--out")


@dataclass(frozen=True)
class ForecastRun:
    path: Path
    model_config: ForecastModelConfig
    train_config: ForecastTrainConfig
    series: tuple[dict[str, Any], ...]


def save_run(path: Path, model: TimeMoE, train_config: ForecastTrainConfig,
             series: list[dict[str, Any]]) -> None:
    """Weights first, then forecast.json (atomically): a run dir with forecast.json is whole."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / WEIGHTS))
    meta = {"model": model.config.to_dict(), "train": train_config.to_dict(), "series": series}
    tmp = path / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path / RUN_FILE)


def load_run(path: str | Path, device: str | torch.device = "cpu"
             ) -> tuple[ForecastRun, TimeMoE]:
    path = Path(path)
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise ValueError(f"{str(path)!r} holds no {RUN_FILE} (not a finished `moeflow forecast "
                         f"train` run)")
    try:
        meta = json.loads(meta_path.read_text())
        model_config = ForecastModelConfig.from_dict(meta["model"])
        train_config = ForecastTrainConfig(**meta["train"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: malformed run file: {e}") from None
    model = TimeMoE(model_config)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS), device="cpu"))
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise different types
        raise ValueError(f"{path / WEIGHTS}: cannot load weights: {e}") from None
    model.to(device).eval()
    return ForecastRun(path, model_config, train_config, tuple(meta["series"])), model
