"""Forecasts from a trained TimeMoE: the multi-resolution head choice, and `moeflow forecast
predict`, which forecasts past the end of each series.

    moeflow forecast predict --run runs/fc --data co2 --horizon 36 --out co2_forecast.csv

Choosing heads (Time-MoE's multi-resolution forecasting): for a horizon of R remaining points
the smallest head with h >= R answers in one pass, truncated to R; when R exceeds the longest
head, that head's h points are appended to the history as if observed and the forecast
continues from there. Only the first pass's intervals are calibrated by training: later passes
condition on the point path, so their intervals leave out the uncertainty of the points fed
back (too narrow); eval reports coverage, so this shows where it matters.

A horizon is at most the model's context_len: past that, every pass would read nothing but
the model's own earlier forecasts (and take its scale from them), so predict refuses it rather
than roll out for minutes.

--out is written only where nothing is: an existing file (or directory) is refused before any
forecasting, as is a directory that does not exist.

Each pass reads the last context_len points of the history, standardised by their first
norm_len points (moeflow.forecast.windows), and maps the outputs back. Quantile outputs are
sorted per step (monotone rearrangement), so a lower level never lies above a higher one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import torch

from moeflow.forecast.config import ForecastModelConfig, PredictConfig
from moeflow.forecast.data import load_series
from moeflow.forecast.model import TimeMoE
from moeflow.forecast.run import load_run
from moeflow.validate import check_new_file
from moeflow.forecast.windows import scale_of


@dataclass(frozen=True)
class Forecast:
    point: np.ndarray  # [H]
    quantiles: np.ndarray  # [H, Q], levels as the model's config.quantiles


def pick_head(horizons: tuple[int, ...], remaining: int) -> int:
    """Index of the head answering `remaining` points: the smallest that covers them all, or
    the longest when none does."""
    for i, h in enumerate(horizons):
        if h >= remaining:
            return i
    return len(horizons) - 1


@torch.no_grad()
def forecast(model: TimeMoE, histories: list[np.ndarray], horizon: int) -> list[Forecast]:
    """`horizon` points past the end of each history, all histories in one batch per pass."""
    c = model.config
    for i, h in enumerate(histories):
        if len(h) < c.norm_len:
            raise ValueError(f"history {i} has {len(h)} points; the model needs at least "
                             f"norm_len={c.norm_len}")
    device = next(model.parameters()).device
    paths = [list(np.asarray(h, dtype=np.float64)) for h in histories]
    points = [[] for _ in histories]
    quants = [[] for _ in histories]
    remaining = horizon
    while remaining > 0:
        head = pick_head(c.horizons, remaining)
        take = min(remaining, c.horizons[head])
        B, L = len(paths), c.context_len
        x_BL = np.zeros((B, L))
        last_B = np.zeros(B, dtype=np.int64)
        scales = []
        for b, path in enumerate(paths):
            ctx = np.asarray(path[-L:])
            mean, std = scale_of(ctx[:c.norm_len])
            scales.append((mean, std))
            x_BL[b, :len(ctx)] = (ctx - mean) / std
            last_B[b] = len(ctx) - 1
        out = model(torch.from_numpy(x_BL).float().to(device), inference=True)
        pred_BHC = out.heads[head][torch.arange(B), torch.from_numpy(last_B).to(device)]
        pred_BHC = pred_BHC[:, :take].double().cpu().numpy()
        for b, (mean, std) in enumerate(scales):
            values_HC = pred_BHC[b] * std + mean
            points[b].append(values_HC[:, 0])
            quants[b].append(np.sort(values_HC[:, 1:], axis=1))
            paths[b].extend(values_HC[:, 0].tolist())
        remaining -= take
    return [Forecast(np.concatenate(p), np.concatenate(q)) for p, q in zip(points, quants)]


def check_horizon(horizon: int, config: ForecastModelConfig) -> None:
    if horizon > config.context_len:
        raise ValueError(f"--horizon {horizon}: at most the model's context_len "
                         f"({config.context_len}); past that a forecast would read only its own "
                         f"earlier forecasts")


def predict_csv(cfg: PredictConfig) -> str:
    """The CSV `moeflow forecast predict` prints: series, step (1 = the first point after the
    series), point, one column per quantile level."""
    if cfg.out is not None:
        check_new_file(cfg.out)
    run, model = load_run(cfg.run)
    check_horizon(cfg.horizon, run.model_config)
    sources = cfg.data or run.train_config.data
    columns = cfg.column if cfg.data else run.train_config.column
    series = load_series(sources, columns, cfg.period)
    results = forecast(model, [s.values for s in series], cfg.horizon)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["series", "step", "point", *(f"q{q:g}" for q in run.model_config.quantiles)])
    for s, f in zip(series, results):
        for i in range(cfg.horizon):
            writer.writerow([s.name, i + 1, f"{f.point[i]:.6g}",
                             *(f"{v:.6g}" for v in f.quantiles[i])])
    return buf.getvalue()
