"""The forecaster's objective: Huber on the point head, pinball on the quantile heads, averaged
over the horizons, plus the routers' balance loss.

Point forecasts use the Huber loss (δ = huber_delta on standardised values), as Time-MoE does:
squared error near the target, absolute error for outliers, so a few spikes (sunspot maxima,
El Niño years) do not dominate. Prediction intervals come from quantile heads trained with the
pinball loss ρ_q(y - ŷ) = max(q·(y - ŷ), (q - 1)·(y - ŷ)), whose minimiser is the q-quantile of
the target given the context. Quantile heads rather than sampling: the interval comes from
the same single forward pass as the point forecast (sampling needs a likelihood head and many
autoregressive rollouts per forecast, Time-MoE has neither), and the pinball loss assumes no
distribution shape, where a Gaussian head would force symmetric intervals on skewed series
such as sunspots. Each head's loss is the mean over the (position, step) pairs its mask keeps;
the heads are weighted equally, as Time-MoE's multi-resolution loss is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.forecast.config import ForecastModelConfig
from moeflow.forecast.model import ForecastOutput
from moeflow.forecast.windows import Batch


@dataclass(frozen=True)
class ForecastLoss:
    total: torch.Tensor  # what is minimised
    huber: torch.Tensor  # point heads, averaged over horizons
    pinball: torch.Tensor  # quantile heads, averaged over horizons and levels (0 when none)
    aux: torch.Tensor  # unweighted balance loss, summed over layers


def pinball(pred: torch.Tensor, target: torch.Tensor, q: float) -> torch.Tensor:
    diff = target - pred
    return torch.maximum(q * diff, (q - 1) * diff)


def forecast_loss(out: ForecastOutput, batch: Batch, config: ForecastModelConfig
                  ) -> ForecastLoss:
    huber, quantile = [], []
    for pred_BLHC, y_BLH, mask_BLH in zip(out.heads, batch.targets, batch.masks):
        n = mask_BLH.sum().clamp(min=1)
        m = mask_BLH.float()
        h = F.huber_loss(pred_BLHC[..., 0], y_BLH, reduction="none", delta=config.huber_delta)
        huber.append((h * m).sum() / n)
        for c, q in enumerate(config.quantiles, start=1):
            quantile.append((pinball(pred_BLHC[..., c], y_BLH, q) * m).sum() / n)
    huber_loss = torch.stack(huber).mean()
    pinball_loss = torch.stack(quantile).mean() if quantile else huber_loss.new_zeros(())
    total = huber_loss + pinball_loss + out.router_loss
    return ForecastLoss(total, huber_loss, pinball_loss, out.aux_loss)
