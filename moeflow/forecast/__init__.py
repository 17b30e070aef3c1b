"""Time-MoE forecasting on moeflow's layers: `moeflow forecast train|predict|eval`.

A decoder-only MoE forecaster (moeflow.forecast.model) over point-wise value embeddings, built
from moeflow's attention, router, dispatcher and experts; multi-resolution heads with Huber
and pinball losses (moeflow.forecast.loss); statsmodels' datasets or a CSV
(moeflow.forecast.data); per-window standardisation (moeflow.forecast.windows); held-out
tails scored against seasonal-naive, ARIMA and ETS (moeflow.forecast.evaluate).
"""

from moeflow.forecast.config import (EvalConfig, ForecastModelConfig, ForecastTrainConfig,
                                     PredictConfig)
from moeflow.forecast.model import TimeMoE

__all__ = ["EvalConfig", "ForecastModelConfig", "ForecastTrainConfig", "PredictConfig",
           "TimeMoE"]
