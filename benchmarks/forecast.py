"""Time-MoE forecasting on statsmodels' datasets vs seasonal-naive, ARIMA and ETS (CPU).

    OMP_NUM_THREADS=1 python benchmarks/forecast.py --out benchmarks/results/forecast

One forecaster (preset `small` unless --preset) is trained per seed on every series of
sunspots, nile, co2, elnino and macrodata together, with the last --holdout points of every
series held out; then `moeflow forecast eval` scores it on those tails twice: one forecast of
the whole tail from its first point, and rolling forecasts of --short points from every origin
inside the tail. The baselines are fitted once per series on the same training parts (they do
not depend on the seed). Writes OUT/summary.json, OUT/README.md (tables, machine, date, the
command) and each run's eval.json and forecasts.png under OUT/seed*/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from moeflow.forecast.config import EvalConfig, ForecastModelConfig, ForecastTrainConfig  # noqa: E402
from moeflow.forecast.evaluate import MOEFLOW, evaluate  # noqa: E402
from moeflow.forecast.train import train_forecaster  # noqa: E402

DATASETS = ("sunspots", "nile", "co2", "elnino", "macrodata")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/forecast")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--holdout", type=int, default=24)
    ap.add_argument("--short", type=int, default=6, help="rolling forecast length")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", nargs="+", default=list(DATASETS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    setups = {"full_tail": dict(horizon=args.holdout, stride=args.holdout),
              f"rolling_{args.short}": dict(horizon=args.short, stride=1)}
    results: dict = {"setups": {}, "train": []}
    for seed in args.seeds:
        run = out / f"seed{seed}"
        cfg = ForecastTrainConfig(data=tuple(args.data), preset=args.preset, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr,
                                  holdout=args.holdout, seed=seed, out=str(run), device="cpu")
        r = train_forecaster(cfg, ForecastModelConfig.from_name(args.preset))
        print(r.summary(), flush=True)
        results["train"].append({"seed": seed, "seconds": r.seconds, "final_loss": r.final_loss})
        for name, kw in setups.items():
            baselines = ("seasonal_naive", "arima", "ets") if seed == args.seeds[0] else ()
            rep = evaluate(EvalConfig(run=str(run), out=str(run / name), baselines=baselines,
                                      **kw))
            print(f"seed {seed} {name}\n{rep.table()}", flush=True)
            slot = results["setups"].setdefault(name, {"moeflow_seeds": [], **kw})
            slot["moeflow_seeds"].append({"seed": seed, "summary": rep.summary[MOEFLOW],
                                          "per_series": {s: m[MOEFLOW] for s, m in
                                                         rep.per_series.items()}})
            if baselines:
                slot["baselines"] = {b: rep.summary[b] for b in baselines}
                slot["baselines_per_series"] = {s: {b: m[b] for b in baselines if b in m}
                                                for s, m in rep.per_series.items()}
    results["meta"] = {
        "date": date.today().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "model": ForecastModelConfig.from_name(args.preset).to_dict(),
        "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "README.md").write_text(report(results))
    print(out / "README.md")


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 \
        else f"{values[0]:.3f}"


def report(results: dict) -> str:
    meta = results["meta"]
    env = f"OMP_NUM_THREADS={meta['omp_num_threads']} " if meta["omp_num_threads"] else ""
    lines = [f"# Time-MoE forecasting vs seasonal-naive, ARIMA, ETS ({meta['date']})", "",
             f"CPU: {meta['cpu']}, torch {meta['torch']}, {meta['threads']} thread(s). "
             f"Command: `{env}{meta['command']}`.", "",
             "One `small` forecaster per seed trained on all series together "
             f"({', '.join(meta['args']['data'])}); the last {meta['args']['holdout']} points of "
             "every series are never trained on and are what is scored. moeflow: mean ± sd over "
             f"seeds {meta['args']['seeds']}; the baselines are deterministic. Lower is better; "
             "coverage is of the 0.1-0.9 interval (nominal 0.8).", ""]
    train_s = [t["seconds"] for t in results["train"]]
    lines += [f"Training: {meta['args']['steps']} steps, {_mean_sd(train_s)} s per seed.", ""]
    for name, slot in results["setups"].items():
        lines += [f"## {name}: horizon {slot['horizon']}, origins every {slot['stride']}", "",
                  "| method | mean MASE | scaled MSE | scaled MAE | coverage |",
                  "|---|---|---|---|---|"]
        seeds = slot["moeflow_seeds"]
        cells = [_mean_sd([s["summary"][k] for s in seeds]) if k in seeds[0]["summary"] else "-"
                 for k in ("mase", "scaled_mse", "scaled_mae", "coverage")]
        lines.append(f"| moeflow TimeMoE | {' | '.join(cells)} |")
        for b, m in slot.get("baselines", {}).items():
            cells = [f"{m[k]:.3f}" if k in m else "-"
                     for k in ("mase", "scaled_mse", "scaled_mae", "coverage")]
            lines.append(f"| {b} | {' | '.join(cells)} |")
        lines += ["", "MASE per series (moeflow: mean over seeds):", "",
                  "| series | moeflow | " + " | ".join(slot.get("baselines", {})) + " | best |",
                  "|---|---|" + "---|" * len(slot.get("baselines", {})) + "---|"]
        for series in seeds[0]["per_series"]:
            ours = float(np.mean([s["per_series"][series]["mase"] for s in seeds]))
            row = {"moeflow": ours}
            for b, m in slot.get("baselines_per_series", {}).get(series, {}).items():
                row[b] = m["mase"]
            best = min(row, key=row.get)
            lines.append(f"| {series} | {ours:.3f} | " + " | ".join(
                f"{row[b]:.3f}" if b in row else "-" for b in slot.get("baselines", {}))
                + f" | {best} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
