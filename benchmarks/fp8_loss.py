"""FP8 against bf16/fp32 training: the same run twice, `moeflow train` without and with --fp8,
and how far apart the loss curves end up (issue 14: "measured against bf16 for loss equality
over 200 steps").

    PYTHONPATH=. python benchmarks/fp8_loss.py --out benchmarks/results/fp8          # 200 steps
    PYTHONPATH=. python benchmarks/fp8_loss.py --steps 50 --out /tmp/fp8 --baseline-seed 1

Both runs go through the library's Trainer (what `moeflow train` runs): the same preset, seed,
built-in corpus (the standard library's sources), tokenizer, batches and initial weights; only
TrainConfig.fp8 differs. On a GPU (device auto) the model trains under bf16 autocast and --fp8
runs torch._scaled_mm / torch._scaled_grouped_mm; on the CPU it trains in fp32 and --fp8 runs
the plain-torch emulation of the same FP8 numerics (moeflow.ops.fp8_linear), so a CPU result
measures the recipe's effect on the loss, not the kernels' speed.

What is compared: the training loss of every step (the FP8 forward's, on the step's batch) and
the validation loss at every validation point. Validation runs without autograd, where FP8 does
not apply (Backends.matmul), so the validation curve compares the weights each run trained,
evaluated the same way. `--baseline-seed S` adds a third run, the plain model from another seed,
to put the FP8 difference next to the seed-to-seed spread.

Writes OUT/fp8_loss.json (per-step losses, the differences, machine, date, command) and
OUT/fp8_loss.md (a short table); prints the table. The runs themselves (metrics.jsonl,
checkpoints) go to --work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from moeflow.train import TrainConfig  # noqa: E402
from moeflow.train.trainer import Trainer  # noqa: E402


def train(args, name: str, fp8: bool, seed: int) -> dict:
    out = Path(args.work) / name
    cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                      val_every=args.val_every, val_batches=args.val_batches, seed=seed,
                      fp8=fp8, device=args.device, out=str(out), progress=False)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "fp8": fp8, "seed": seed, "seconds": time.perf_counter() - t0,
            "device": str(trainer.device),
            "train_loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}}


def differences(a: dict, b: dict, key: str) -> dict:
    steps = sorted(set(a[key]) & set(b[key]))
    delta = {s: b[key][s] - a[key][s] for s in steps}
    final = steps[-1]
    return {"max_abs": max(abs(d) for d in delta.values()),
            "mean_abs": sum(abs(d) for d in delta.values()) / len(delta),
            "final_abs": abs(delta[final]), "final_rel": abs(delta[final]) / a[key][final],
            "final_step": final}


def table(result: dict) -> str:
    plain, fp8 = result["runs"]["plain"], result["runs"]["fp8"]
    steps = result["report_steps"]
    lines = [f"{result['preset']}, {result['steps']} steps, device {plain['device']}, "
             f"{result['date']}", "",
             "| step | train loss plain | train loss FP8 | Δ | val loss plain | val loss FP8 "
             "| Δ |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        cells = []
        for key in ("train_loss", "val_loss"):
            a, b = plain[key].get(s), fp8[key].get(s)
            cells += (["", "", ""] if a is None else [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"])
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    d = result["fp8_vs_plain"]
    lines += ["", f"FP8 vs plain: validation loss max |Δ| {d['val_loss']['max_abs']:.4f}, "
                  f"final |Δ| {d['val_loss']['final_abs']:.4f} "
                  f"({100 * d['val_loss']['final_rel']:.2f} %); training loss max |Δ| "
                  f"{d['train_loss']['max_abs']:.4f}, mean |Δ| {d['train_loss']['mean_abs']:.4f}, "
                  f"final |Δ| {d['train_loss']['final_abs']:.4f}"]
    if "seed_vs_plain" in result:
        s = result["seed_vs_plain"]
        lines.append(f"Plain, seed {result['runs']['seed']['seed']} vs seed "
                     f"{plain['seed']} (the spread between seeds): validation loss max |Δ| "
                     f"{s['val_loss']['max_abs']:.4f}, final |Δ| "
                     f"{s['val_loss']['final_abs']:.4f} (its batches differ too, so its "
                     "training losses are not compared step by step)")
    lines.append(f"Wall time: plain {plain['seconds']:.0f} s, FP8 {fp8['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-seed", type=int, default=None,
                   help="also train the plain model from this seed (the seed-to-seed spread)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="directory for fp8_loss.json and fp8_loss.md")
    p.add_argument("--work", help="directory for the runs (checkpoints, metrics; default: a "
                                  "new temporary directory)")
    args = p.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="fp8_loss_")

    result = {"command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": {"platform": platform.platform(), "cpu": cpu_name(),
                          "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "gpu": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                  else None)},
              "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
              "runs": {}}
    result["runs"]["plain"] = train(args, "plain", False, args.seed)
    result["runs"]["fp8"] = train(args, "fp8", True, args.seed)
    plain, fp8 = result["runs"]["plain"], result["runs"]["fp8"]
    result["fp8_vs_plain"] = {k: differences(plain, fp8, k) for k in ("train_loss", "val_loss")}
    if args.baseline_seed is not None:
        result["runs"]["seed"] = train(args, "seed", False, args.baseline_seed)
        result["seed_vs_plain"] = {k: differences(plain, result["runs"]["seed"], k)
                                   for k in ("train_loss", "val_loss")}
    marks = sorted({0, 1, *range(args.val_every, args.steps + 1, args.val_every), args.steps})
    result["report_steps"] = marks
    text = table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_loss.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "fp8_loss.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
