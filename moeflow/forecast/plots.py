"""OUT/forecasts.png of `moeflow forecast eval`: one panel per series, its recent history, the
held-out tail, and each method's forecast from the tail's first origin, TimeMoE's with its
interval band (the outer quantile levels) and ARIMA's as dotted bounds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moeflow.forecast.data import Series

STYLES = {"moeflow": ("C3", "-"), "seasonal_naive": ("C7", "--"), "arima": ("C0", "--"),
          "ets": ("C2", "--")}


def plot_forecasts(series: list[Series], holdout: int, origins: dict[str, list[int]],
                   methods: dict, levels: tuple[float, ...], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, series):
        n = len(s)
        first = max(0, n - 4 * holdout)
        t = np.arange(first, n)
        ax.plot(t, s.values[first:], color="k", lw=1, label="actual")
        ax.axvline(n - holdout - 0.5, color="k", lw=0.5, ls=":")
        o = origins[s.name][0]
        for method, fc in methods.items():
            if s.name not in fc:
                continue
            f = fc[s.name]
            steps = np.arange(o, o + f.point.shape[1])
            color, ls = STYLES.get(method, ("C4", "--"))
            ax.plot(steps, f.point[0], color=color, ls=ls, lw=1.3, label=method)
            if f.quantiles is not None and len(levels) >= 2:
                lo, hi = f.quantiles[0, :, 0], f.quantiles[0, :, -1]
                if method == "moeflow":
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.2,
                                    label=f"moeflow {levels[0]:g}-{levels[-1]:g}")
                elif method == "arima":
                    ax.plot(steps, lo, color=color, ls=":", lw=0.8)
                    ax.plot(steps, hi, color=color, ls=":", lw=0.8)
        ax.set_title(s.name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
