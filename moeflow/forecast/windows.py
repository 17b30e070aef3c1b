"""Training windows, their scaling, and the multi-horizon targets of every position.

Per-window normalisation. Series differ in level and scale by orders of magnitude (Nile flow
~1000, sunspots ~50, CO2 ~350 and rising), so every window is standardised before the network
sees it, and forecasts are mapped back. The statistics are those of the window's first
`norm_len` points, not of the whole window: the network predicts from every position, and the
mean of the whole window would tell an early position where the later points go (a leak that
the last position, the one used to forecast, never gets). With the prefix rule a position at or
after norm_len - 1 reads only past values, scale included, so training and forecasting see the
same thing and changing a future value never changes a past prediction (tests check this).
Positions before norm_len - 1 carry no loss.

Legend: B windows, L input positions (context_len), H a head's horizon, W = L + max horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeflow.forecast.config import ForecastModelConfig

STD_FLOOR = 1e-8  # a constant prefix scales by 1 (its values are then offsets from its level)


def scale_of(prefix: np.ndarray) -> tuple[float, float]:
    """(mean, std) that standardise a window whose first norm_len points are `prefix`."""
    mean, std = float(prefix.mean()), float(prefix.std())
    return mean, std if std > STD_FLOOR * max(1.0, abs(mean)) else 1.0


@dataclass(frozen=True)
class Batch:
    inputs_BL: torch.Tensor  # standardised inputs, right-padded with 0
    targets: tuple[torch.Tensor, ...]  # per head [B, L, H]: standardised future values
    masks: tuple[torch.Tensor, ...]  # per head [B, L, H]: True where a target exists and counts


class WindowSampler:
    """Random windows of up to context_len + max horizon points from the training series,
    each window equally likely (a long series gives more windows). Every window starts early
    enough to hold norm_len + 1 points, so it has at least one target."""

    def __init__(self, train_series: list[np.ndarray], config: ForecastModelConfig,
                 seed: int) -> None:
        self.config = config
        self.series = [np.asarray(s, dtype=np.float64) for s in train_series]
        self.starts = np.array([len(s) - config.norm_len for s in self.series])
        if (self.starts < 1).any():
            raise ValueError(f"every training series needs more than norm_len="
                             f"{config.norm_len} points")
        self.p = self.starts / self.starts.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> Batch:
        c = self.config
        W = c.context_len + c.max_horizon
        which = self.rng.choice(len(self.series), size=batch_size, p=self.p)
        windows_BW = np.full((batch_size, W), np.nan)
        n_inputs = np.zeros(batch_size, dtype=np.int64)
        for b, i in enumerate(which):
            s = self.series[i]
            start = int(self.rng.integers(0, self.starts[i]))
            win = s[start:start + W]
            mean, std = scale_of(win[:c.norm_len])
            windows_BW[b, :len(win)] = (win - mean) / std
            n_inputs[b] = min(c.context_len, len(win) - 1)
        return make_batch(windows_BW, n_inputs, c)


def make_batch(windows_BW: np.ndarray, n_inputs: np.ndarray, config: ForecastModelConfig
               ) -> Batch:
    """Inputs and every head's targets from standardised windows (NaN past each window's end)
    of which the first n_inputs[b] points are inputs."""
    L = config.context_len
    B = windows_BW.shape[0]
    pos_L = np.arange(L)
    inputs_BL = np.where(pos_L[None] < n_inputs[:, None], windows_BW[:, :L], 0.0)
    inputs_BL = np.nan_to_num(inputs_BL)
    counted_BL = (pos_L[None] >= config.norm_len - 1) & (pos_L[None] < n_inputs[:, None])
    targets, masks = [], []
    for H in config.horizons:
        idx_LH = pos_L[:, None] + 1 + np.arange(H)[None]
        y_BLH = np.full((B, L, H), np.nan)
        inside = idx_LH < windows_BW.shape[1]
        y_BLH[:, inside] = windows_BW[:, idx_LH[inside]]
        mask_BLH = ~np.isnan(y_BLH) & counted_BL[:, :, None]
        targets.append(torch.from_numpy(np.nan_to_num(y_BLH)).float())
        masks.append(torch.from_numpy(mask_BLH))
    return Batch(torch.from_numpy(inputs_BL).float(), tuple(targets), tuple(masks))
