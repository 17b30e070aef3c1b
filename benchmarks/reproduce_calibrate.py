"""Size the `gpu` scale of `moeflow reproduce` from measured throughput, on the GPU it targets.

Runs the whole reproduction pipeline (data preparation at the gpu scale's full size, every stage,
the final evaluation, the engine timings and the report) with a few steps per stage, then prints
each stage's median training tokens/s over the steps after warm-up and what the gpu scale's
budget costs at those rates. The gpu scale's `steps` were chosen from this output
(benchmarks/results/reproduce/).

    PYTHONPATH=. python benchmarks/reproduce_calibrate.py --out /tmp/calib --steps 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.reproduce.runner import ReproduceOptions, reproduce  # noqa: E402
from moeflow.reproduce.family import STAGES  # noqa: E402
from moeflow.reproduce.scale import SCALES  # noqa: E402
from moeflow.train.metrics import read_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-bytes", type=int, default=None, help="override the corpus size")
    args = p.parse_args()
    gpu = SCALES["gpu"]
    data = gpu.data if args.max_bytes is None else dataclasses.replace(gpu.data,
                                                                        max_bytes=args.max_bytes)
    SCALES["calibrate"] = dataclasses.replace(
        gpu, name="calibrate", data=data, steps=args.steps, warmup_steps=5,
        val_every=args.steps // 2, eval_windows=64, decode_steps=16)
    reproduce(ReproduceOptions(out=args.out, scale="calibrate", progress=False))
    manifest = json.loads((Path(args.out) / "reproduce.json").read_text())
    dataset = json.loads((Path(args.out) / "data" / "dataset.json").read_text())
    rows, total_s = [], dataset["seconds"]
    for name in STAGES:
        metrics = [r for r in read_metrics(Path(args.out) / "runs" / name / "metrics.jsonl")
                   if r.get("tokens_per_s")]
        rate = statistics.median(r["tokens_per_s"] for r in metrics[5:])
        full = gpu.tokens_per_stage / rate
        total_s += full + manifest["stages"][name]["measure"]["seconds"]
        rows.append((name, rate, full, manifest["stages"][name]["measure"]["seconds"]))
    print(f"data: {dataset['train_tokens']:,} train tokens, prepared in {dataset['seconds']:.0f} s")
    print(f"{'stage':<18}{'tokens/s':>12}{'gpu-scale train s':>20}{'measure s':>12}")
    for name, rate, full, measure in rows:
        print(f"{name:<18}{rate:>12,.0f}{full:>20.0f}{measure:>12.1f}")
    print(f"gpu scale ({gpu.steps} steps, {gpu.tokens_per_stage:,} tokens per stage): "
          f"~{total_s / 60:.1f} min of training, measuring and data preparation "
          f"(validation and checkpoints not included)")


if __name__ == "__main__":
    main()
