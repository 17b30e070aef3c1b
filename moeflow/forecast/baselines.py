"""The forecasts TimeMoE is compared with: seasonal-naive, ARIMA and ETS (statsmodels).

Every baseline is fitted on the same training part the forecaster trained on (the series minus
its held-out tail) and forecasts from the same origins, reading the same history up to each
origin; the tail's values before an origin are read as history but never refit on.

seasonal_naive: ŷ[o + j] = y[o + j - m·(⌊j/m⌋ + 1)], the last observed season repeated (m = 1 is
  the naive last value). No interval.
arima: statsmodels' SARIMAX-based ARIMA chosen like auto.arima, without its stepwise search:
  D = 1 when m > 1 and STL's seasonal strength exceeds 0.64 (Hyndman's rule), d ∈ {0, 1} by
  the KPSS test at 5% on the (seasonally differenced) series, then (p, q) ∈ {0, 1, 2}² by AIC,
  with a constant (d + D = 0) or drift (d + D = 1); the seasonal part is (0, 1, 1)m when D = 1
  and (1, 0, 0)m for other seasonal series. At each origin the fitted parameters are run over
  the history (`apply`, no refit). Gaussian intervals from the forecast's standard error.
ets: statsmodels' ETSModel with additive errors; trend none or additive damped, season none or
  additive (m > 1 with two full seasons), the lowest AIC; at each origin the fitted parameters
  smooth the history (no refit). Gaussian intervals from the forecast variance.
A fit that fails (statsmodels raises, or no candidate converges) leaves that baseline out for
that series, and eval says so.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np

Z_EPS = 1e-12


@dataclass(frozen=True)
class BaselineForecast:
    point: np.ndarray  # [H]
    quantiles: np.ndarray | None  # [H, Q] at the requested levels, None without intervals


def seasonal_naive(history: np.ndarray, horizon: int, period: int) -> np.ndarray:
    m = min(period, len(history))
    j = np.arange(horizon)
    return history[len(history) + j - m * (j // m + 1)]


def _normal_quantiles(mean: np.ndarray, sd: np.ndarray, levels: tuple[float, ...]
                      ) -> np.ndarray:
    from scipy.stats import norm

    return mean[:, None] + np.maximum(sd, Z_EPS)[:, None] * norm.ppf(np.asarray(levels))[None]


def _seasonal_strength(y: np.ndarray, period: int) -> float:
    from statsmodels.tsa.seasonal import STL

    res = STL(y, period=period).fit()
    rem, season = res.resid, res.seasonal
    return max(0.0, 1.0 - np.var(rem) / max(np.var(season + rem), Z_EPS))


def _kpss_says_difference(y: np.ndarray) -> bool:
    from statsmodels.tsa.stattools import kpss

    p_value = kpss(y, regression="c", nlags="auto")[1]
    return p_value < 0.05


class ARIMABaseline:
    def __init__(self, train: np.ndarray, period: int) -> None:
        from statsmodels.tsa.arima.model import ARIMA

        seasonal = period > 1 and len(train) >= 3 * period
        D = int(seasonal and _seasonal_strength(train, period) > 0.64)
        z = train[period:] - train[:-period] if D else train
        d = int(_kpss_says_difference(z))
        if seasonal:
            sorder = (0, 1, 1, period) if D else (1, 0, 0, period)
        else:
            sorder = (0, 0, 0, 0)
        trend = "c" if d + D == 0 else "t" if d + D == 1 else "n"
        best = None
        for p, q in itertools.product(range(3), range(3)):
            try:
                fit = ARIMA(train, order=(p, d, q), seasonal_order=sorder, trend=trend).fit()
            except (ValueError, np.linalg.LinAlgError):
                continue
            if np.isfinite(fit.aic) and (best is None or fit.aic < best.aic):
                best = fit
        if best is None:
            raise ValueError("no ARIMA candidate could be fitted")
        self.result = best
        self.spec = f"ARIMA({best.model.order}, seasonal {sorder}, trend {trend})"

    def forecast(self, history: np.ndarray, horizon: int, levels: tuple[float, ...]
                 ) -> BaselineForecast:
        res = self.result.apply(history)
        f = res.get_forecast(horizon)
        mean = np.asarray(f.predicted_mean)
        return BaselineForecast(mean, _normal_quantiles(mean, np.asarray(f.se_mean), levels))


class ETSBaseline:
    def __init__(self, train: np.ndarray, period: int) -> None:
        import pandas as pd
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        seasons = [None, "add"] if period > 1 and len(train) >= 2 * period else [None]
        best = None
        for trend, season in itertools.product([None, "add"], seasons):
            kw = dict(error="add", trend=trend, damped_trend=trend is not None,
                      seasonal=season, seasonal_periods=period if season else None)
            try:
                fit = ETSModel(pd.Series(train), **kw).fit(disp=False)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if np.isfinite(fit.aic) and (best is None or fit.aic < best[0].aic):
                best = (fit, kw)
        if best is None:
            raise ValueError("no ETS candidate could be fitted")
        self.result, self.kw = best
        self.spec = (f"ETS(A,{'Ad' if self.kw['trend'] else 'N'},"
                     f"{'A' if self.kw['seasonal'] else 'N'})")

    def forecast(self, history: np.ndarray, horizon: int, levels: tuple[float, ...]
                 ) -> BaselineForecast:
        import pandas as pd
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        res = ETSModel(pd.Series(history), **self.kw).smooth(self.result.params)
        pred = res.get_prediction(start=len(history), end=len(history) + horizon - 1)
        mean = np.asarray(pred.predicted_mean)
        sd = np.sqrt(np.maximum(np.asarray(pred.var_pred_mean), 0.0))
        return BaselineForecast(mean, _normal_quantiles(mean, sd, levels))


def fit_baseline(name: str, train: np.ndarray, period: int):
    """A fitted model with `.forecast(history, horizon, levels)` and `.spec`; statsmodels'
    convergence chatter is silenced (the AIC choice already skips bad fits). statsmodels turns
    its warnings to "always" when first imported, so it is imported before the filter is set."""
    import statsmodels.tsa.api  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARIMABaseline(train, period) if name == "arima" else ETSBaseline(train, period)
