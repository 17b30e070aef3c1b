"""`moeflow forecast eval`: score a run on the held-out tails against seasonal-naive, ARIMA, ETS.

    moeflow forecast eval --run runs/fc                       # the run's series and holdout
    moeflow forecast eval --run runs/fc --horizon 12 --stride 6 --baselines seasonal_naive

The tail is the last `holdout` points of each series (the run's, unless --holdout is given),
which training never read. Forecast origins start at the tail's first point and step by
`stride` while a whole `horizon` fits inside the tail (default: one origin, horizon = the
whole tail). Every method reads the same history before each origin (moeflow.forecast.baselines
says how the baselines are fitted).

Metrics, per series and method, over all (origin, step) pairs: MSE and MAE in the series'
units; MASE = MAE / the in-sample MAE of the seasonal-naive forecast on the training part
(Hyndman & Koehler; period m, or 1 where the seasonal differences are all 0); and, where a
method gives intervals, the coverage of the outer quantile levels' interval (0.1-0.9 is an 80%
interval). Across series (units differ): the mean MASE, and MSE/MAE on values standardised by
each series' training mean and std ("scaled"). Writes OUT/eval.json and OUT/forecasts.png; OUT
(default RUN/eval) must not exist or be empty, so an evaluation never replaces an earlier one
or drops files into another run's directory. A period must leave more than one period of
points before the tail (moeflow.forecast.data.check_period).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.forecast.baselines import fit_baseline, seasonal_naive
from moeflow.forecast.config import EvalConfig
from moeflow.forecast.data import Series, check_period, load_series
from moeflow.forecast.predict import forecast
from moeflow.forecast.run import check_out_dir, load_run

MOEFLOW = "moeflow"


@dataclass(frozen=True)
class SeriesForecasts:
    """One method's forecasts of one series: [origins, horizon] points and, if any, intervals
    [origins, horizon, Q]."""

    point: np.ndarray
    quantiles: np.ndarray | None
    spec: str


@dataclass(frozen=True)
class EvalReport:
    out: Path
    summary: dict[str, dict[str, float]]  # method -> aggregate metrics
    per_series: dict[str, dict[str, dict[str, float]]]  # series -> method -> metrics

    def table(self) -> str:
        cols = ("mase", "scaled_mse", "scaled_mae", "coverage")
        lines = [f"{'method':<16}" + "".join(f"{c:>12}" for c in cols)]
        for method, m in self.summary.items():
            cells = "".join(f"{m[c]:>12.4f}" if c in m else f"{'-':>12}" for c in cols)
            lines.append(f"{method:<16}{cells}")
        return "\n".join(lines)


def mase_scale(train: np.ndarray, period: int) -> float:
    for m in (period, 1):
        if len(train) > m:
            scale = float(np.mean(np.abs(train[m:] - train[:-m])))
            if scale > 0:
                return scale
    return 1.0


def series_metrics(actual: np.ndarray, f: SeriesForecasts, train: np.ndarray, period: int
                   ) -> dict[str, float]:
    err = f.point - actual
    std = float(train.std()) or 1.0
    out = {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))),
           "mase": float(np.mean(np.abs(err)) / mase_scale(train, period)),
           "scaled_mse": float(np.mean((err / std) ** 2)),
           "scaled_mae": float(np.mean(np.abs(err / std)))}
    if f.quantiles is not None and f.quantiles.shape[-1] >= 2:
        inside = (actual >= f.quantiles[..., 0]) & (actual <= f.quantiles[..., -1])
        out["coverage"] = float(inside.mean())
    return out


def _origins(n: int, holdout: int, horizon: int, stride: int) -> list[int]:
    return list(range(n - holdout, n - horizon + 1, stride))


def evaluate(cfg: EvalConfig, log=print) -> EvalReport:
    run, model = load_run(cfg.run)
    levels = run.model_config.quantiles
    sources = cfg.data or run.train_config.data
    columns = cfg.column if cfg.data else run.train_config.column
    period = cfg.period if cfg.period is not None else (
        run.train_config.period if not cfg.data else None)
    series = load_series(sources, columns, period)
    holdout = cfg.holdout or run.train_config.holdout
    horizon = cfg.horizon or holdout
    stride = cfg.stride or horizon
    if not cfg.data and holdout > run.train_config.holdout:
        raise ValueError(f"holdout={holdout}: the run trained on all but the last "
                         f"{run.train_config.holdout} points of its series; a longer tail "
                         f"would score points it trained on")
    if horizon > holdout:
        raise ValueError(f"horizon={horizon}: must be <= the holdout ({holdout})")
    for s in series:
        need = holdout + run.model_config.norm_len
        if len(s) < need:
            raise ValueError(f"series {s.name!r} has {len(s)} points; the holdout of {holdout} "
                             f"needs at least {need}")
        check_period(s, len(s) - holdout, holdout, given=cfg.period is not None or (
            not cfg.data and run.train_config.period is not None))
    out = Path(cfg.out) if cfg.out else run.path / "eval"
    check_out_dir(out, default=not cfg.out)
    origins = {s.name: _origins(len(s), holdout, horizon, stride) for s in series}

    t0 = time.perf_counter()
    histories = [s.values[:o] for s in series for o in origins[s.name]]
    ours = iter(forecast(model, histories, horizon))
    methods: dict[str, dict[str, SeriesForecasts]] = {MOEFLOW: {}}
    for s in series:
        fs = [next(ours) for _ in origins[s.name]]
        methods[MOEFLOW][s.name] = SeriesForecasts(
            np.stack([f.point for f in fs]), np.stack([f.quantiles for f in fs]), "TimeMoE")
    seconds = {MOEFLOW: time.perf_counter() - t0}
    for name in cfg.baselines:
        t0 = time.perf_counter()
        methods[name] = {}
        for s in series:
            got = _baseline(name, s, holdout, origins[s.name], horizon, levels, log)
            if got is not None:
                methods[name][s.name] = got
        seconds[name] = time.perf_counter() - t0

    per_series: dict[str, dict[str, dict[str, Any]]] = {}
    for s in series:
        train = s.values[:len(s) - holdout]
        actual = np.stack([s.values[o:o + horizon] for o in origins[s.name]])
        per_series[s.name] = {
            method: {**series_metrics(actual, fc[s.name], train, s.period),
                     "spec": fc[s.name].spec}
            for method, fc in methods.items() if s.name in fc}
    summary = {}
    for method in methods:
        rows = [per_series[s.name][method] for s in series if method in per_series[s.name]]
        agg = {k: float(np.mean([r[k] for r in rows]))
               for k in ("mase", "scaled_mse", "scaled_mae", "coverage")
               if rows and all(k in r for r in rows)}
        agg["series"] = len(rows)
        agg["seconds"] = seconds[method]
        summary[method] = agg

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "run": str(run.path), "holdout": holdout, "horizon": horizon, "stride": stride,
        "interval_levels": [levels[0], levels[-1]] if len(levels) >= 2 else None,
        "origins": origins, "summary": summary, "per_series": per_series,
        "forecasts": {m: {name: {"point": f.point.tolist(),
                                 "quantiles": None if f.quantiles is None
                                 else f.quantiles.tolist()}
                          for name, f in fc.items()} for m, fc in methods.items()}}
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    from moeflow.forecast.plots import plot_forecasts

    plot_forecasts(series, holdout, origins, methods, levels, out / "forecasts.png")
    return EvalReport(out, summary, per_series)


def _baseline(name: str, s: Series, holdout: int, origins: list[int], horizon: int,
              levels: tuple[float, ...], log) -> SeriesForecasts | None:
    if name == "seasonal_naive":
        point = np.stack([seasonal_naive(s.values[:o], horizon, s.period) for o in origins])
        return SeriesForecasts(point, None, f"seasonal naive, m={s.period}")
    train = s.values[:len(s) - holdout]
    try:
        fitted = fit_baseline(name, train, s.period)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fs = [fitted.forecast(s.values[:o], horizon, levels) for o in origins]
    except (ValueError, np.linalg.LinAlgError) as e:
        log(f"note: {name} left out for {s.name}: {e}")
        return None
    return SeriesForecasts(np.stack([f.point for f in fs]),
                           np.stack([f.quantiles for f in fs]), fitted.spec)
