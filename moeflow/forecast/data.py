"""The series a forecaster trains and is evaluated on: statsmodels' shipped datasets or a CSV.

Shipped datasets (statsmodels, the `forecast` extra; nothing is downloaded), with the seasonal
period used by seasonal-naive and MASE:
  sunspots   yearly sunspot activity 1700-2008 (309 points), period 11 (the solar cycle)
  nile       yearly Nile flow at Aswan 1871-1970 (100 points), period 1
  co2        Mauna Loa CO2, weekly 1958-2001 averaged to months (526 points), period 12;
             the weeks statsmodels marks missing are skipped by the monthly mean
  elnino     monthly sea surface temperature 1950-2010 (732 points), period 12
  macrodata  US quarterly macro series 1959-2009 (203 points each, one series per column);
             they are seasonally adjusted, so period 1
A CSV file gives one series per numeric column (or the `--column`s asked for), rows in time
order; empty cells inside a column are linearly interpolated (leading/trailing ones dropped).
A missing column, a non-numeric cell, a non-finite number (nan, inf: leave a missing value's
cell empty instead) or a series with no values is a ValueError naming it. A seasonal period
must leave more than one period of training points (check_period): seasonal-naive repeats the
last period and MASE scales by the period's differences.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("sunspots", "nile", "co2", "elnino", "macrodata")
PERIODS = {"sunspots": 11, "nile": 1, "co2": 12, "elnino": 12, "macrodata": 1}


@dataclass(frozen=True)
class Series:
    name: str  # "dataset" or "dataset:column"
    values: np.ndarray  # float64, time order
    period: int

    def __len__(self) -> int:
        return len(self.values)


def load_series(sources: tuple[str, ...], columns: tuple[str, ...] = (),
                period: int | None = None) -> list[Series]:
    """Every series of every source, in order; `period` overrides the datasets' own."""
    out: list[Series] = []
    for source in sources:
        if source in DATASETS:
            out += _statsmodels(source, columns)
        elif Path(source).suffix.lower() == ".csv" or Path(source).is_file():
            out += _csv(Path(source), columns)
        else:
            raise ValueError(f"--data {source!r}: neither a dataset ({', '.join(DATASETS)}) "
                             f"nor a CSV file")
    if period is not None:
        out = [Series(s.name, s.values, period) for s in out]
    return out


def _statsmodels(name: str, columns: tuple[str, ...]) -> list[Series]:
    try:
        from statsmodels import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} needs statsmodels: pip install 'moeflow[forecast]'"
                         ) from None
    frame = getattr(datasets, name).load_pandas().data
    if name == "sunspots":
        series = {"SUNACTIVITY": frame["SUNACTIVITY"].to_numpy()}
    elif name == "nile":
        series = {"volume": frame["volume"].to_numpy()}
    elif name == "co2":
        series = {"co2": frame["co2"].resample("MS").mean().interpolate().to_numpy()}
    elif name == "elnino":
        series = {"temperature": frame.drop(columns="YEAR").to_numpy().reshape(-1)}
    else:
        series = {c: frame[c].to_numpy() for c in frame.columns if c not in ("year", "quarter")}
    for c in columns:
        if c not in series:
            raise ValueError(f"dataset {name!r} has no column {c!r}; its columns: "
                             f"{', '.join(series)}")
    chosen = columns or tuple(series)
    single = len(series) == 1
    return [Series(name if single else f"{name}:{c}", np.asarray(series[c], dtype=np.float64),
                   PERIODS[name]) for c in chosen]


def _csv(path: Path, columns: tuple[str, ...]) -> list[Series]:
    if not path.is_file():
        raise ValueError(f"CSV file {str(path)!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    for c in columns:
        if c not in header:
            raise ValueError(f"{path}: no column {c!r}; its columns: {', '.join(header)}")
    parsed: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if columns and name not in columns:
            continue
        values, bad, nonfinite = _parse_column(body, j)
        if bad is not None:
            if columns:
                line, cell = bad
                raise ValueError(f"{path}: column {name!r} is not numeric "
                                 f"(line {line}: {cell!r})")
            continue  # a date or label column, skipped when no columns were named
        if nonfinite is not None:
            line, cell = nonfinite
            raise ValueError(f"{path}: column {name!r} has a non-finite value at line {line} "
                             f"({cell!r}); leave a missing value's cell empty (it is "
                             f"interpolated)")
        parsed[name] = values
    if not parsed:
        raise ValueError(f"{path}: no numeric column (columns: {', '.join(header)})")
    return [Series(f"{path.stem}:{name}", _fill_gaps(values, f"{path}: column {name!r}"), 1)
            for name, values in parsed.items()]


def _parse_column(body: list[list[str]], j: int
                  ) -> tuple[np.ndarray, tuple[int, str] | None, tuple[int, str] | None]:
    """The column's floats (NaN for empty cells), the first non-numeric (line, cell) and the
    first non-finite one (nan, inf, 1e999). A column with a non-numeric cell is a label column
    even if some cells read as nan or inf; one that is all numbers but for a non-finite value
    is a numeric column with a bad value."""
    values = np.full(len(body), np.nan)
    nonfinite = None
    for i, row in enumerate(body):
        cell = row[j].strip() if j < len(row) else ""
        if cell == "":
            continue
        try:
            v = float(cell)
        except ValueError:
            return values, (i + 2, cell), nonfinite
        if not math.isfinite(v):
            nonfinite = nonfinite or (i + 2, cell)
            continue
        values[i] = v
    return values, None, nonfinite


def _fill_gaps(values: np.ndarray, what: str) -> np.ndarray:
    known = np.flatnonzero(~np.isnan(values))
    if len(known) == 0:
        raise ValueError(f"{what} has no values")
    values = values[known[0]:known[-1] + 1]
    gaps = np.isnan(values)
    if gaps.any():
        idx = np.arange(len(values))
        values = values.copy()
        values[gaps] = np.interp(idx[gaps], idx[~gaps], values[~gaps])
    return values


def split_holdout(series: list[Series], holdout: int, min_train: int) -> list[Series]:
    """The training part of every series: all but its last `holdout` points, which no training
    step ever reads. A series too short to keep `min_train` points is a ValueError."""
    out = []
    for s in series:
        if len(s) - holdout < min_train:
            raise ValueError(f"series {s.name!r} has {len(s)} points: too short for a holdout "
                             f"of {holdout} and at least {min_train} training points")
        out.append(Series(s.name, s.values[:-holdout], s.period))
    return out


def check_period(s: Series, n_train: int, holdout: int, given: bool) -> None:
    """Seasonal-naive repeats the last `period` points and MASE scales by the mean absolute
    `period`-difference of the training part: both need more than one period of it (a longer
    period silently fell back to the last value and to 1-differences)."""
    if s.period >= n_train:
        what = f"--period {s.period}" if given else f"period {s.period} (the dataset's)"
        raise ValueError(f"{what}: series {s.name!r} has {n_train} points before its held-out "
                         f"tail of {holdout}; seasonal-naive and MASE need more than one period "
                         f"of them (a period below {n_train})")
