"""FP8 against bf16/fp32 training: the same run twice, `moeflow train` without and with --fp8,
and how far apart the loss curves end up (issue 14: "measured against bf16 for loss equality
over 200 steps").

    PYTHONPATH=. python benchmarks/fp8_loss.py --out benchmarks/results/fp8          # 200 steps
    PYTHONPATH=. python benchmarks/fp8_loss.py --steps 50 --out /tmp/fp8 --baseline-seed 1
    PYTHONPATH=. python benchmarks/fp8_loss.py --preset finegrained-1b --batch-size 4 \
        --lr 3e-4 --rerun --out /tmp/fp8 --variant experts_ref=experts:reference

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
to put the FP8 difference next to the seed-to-seed spread; `--rerun` trains plain again from
the same seed (the run-to-run spread of GPU kernels that are not bit-deterministic).
`--variant NAME=field:value,...` adds a plain run with those Backends fields fixed (the same
seed and batches), compared with plain step by step: which implementation moves the curve.
Why these: on the H200 finegrained-1b's FP8 run ended 0.29 below plain bf16 at the default lr
(sessions 22-23); the spreads and variants showed it was one loss spike of the plain run, not
a kernel, and at `--lr 3e-4` the two end within the seed-to-seed spread
(benchmarks/results/fp8/README.md).

Writes OUT/fp8_loss.json (per-step losses, the differences, machine, date, command) and
OUT/fp8_loss.md (a short table); prints the table. The runs themselves (metrics.jsonl; no
checkpoint: only the metrics are read) go to --work.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.train import TrainConfig  # noqa: E402
from moeflow.train.trainer import Trainer  # noqa: E402


class _ChosenBackends(Trainer):
    """The Trainer with some Backends fields fixed (a --variant run)."""

    def __init__(self, cfg: TrainConfig, backends: dict[str, str]):
        self.chosen = backends  # before Trainer.__init__, which builds the model
        super().__init__(cfg)

    def backends(self) -> Backends:
        return dataclasses.replace(super().backends(), **self.chosen)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'NAME=field:value,...' (Backends fields) -> (NAME, {field: value})."""
    name, _, spec = text.partition("=")
    fields = dict(item.split(":", 1) for item in spec.split(",") if item)
    known = {f.name for f in dataclasses.fields(Backends)}
    if not name or not fields or set(fields) - known:
        raise SystemExit(f"--variant {text!r}: expected NAME=field:value,... with fields from "
                         f"{', '.join(sorted(known))}")
    try:
        Backends(**fields)  # an unknown value fails here, before any run
    except ValueError as e:
        raise SystemExit(f"--variant {text!r}: {e}") from None
    return name, fields


def train(args, name: str, fp8: bool, seed: int, backends: dict[str, str] | None = None
          ) -> dict:
    out = Path(args.work) / name
    cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                      val_every=args.val_every, val_batches=args.val_batches, seed=seed,
                      lr=args.lr,
                      fp8=fp8, device=args.device, out=str(out), progress=False,
                      # Only the metrics are read: a final checkpoint (weights and AdamW state,
                      # ~50 GB for finegrained-1b) filled the H200 machine's disk (session 22).
                      save_at_end=False)
    t0 = time.perf_counter()
    trainer = _ChosenBackends(cfg, backends) if backends else Trainer(cfg)
    trainer.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "fp8": fp8, "seed": seed, "lr": trainer.cfg.lr,
            "backends": backends or {},
            "seconds": time.perf_counter() - t0,
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
    if "rerun_vs_plain" in result:
        r = result["rerun_vs_plain"]
        lines.append(f"Plain again, seed {plain['seed']} (the device's run-to-run spread): "
                     f"validation loss max |Δ| {r['val_loss']['max_abs']:.4f}, final |Δ| "
                     f"{r['val_loss']['final_abs']:.4f}; training loss mean |Δ| "
                     f"{r['train_loss']['mean_abs']:.4f}")
    if "seed_vs_plain" in result:
        s = result["seed_vs_plain"]
        lines.append(f"Plain, seed {result['runs']['seed']['seed']} vs seed "
                     f"{plain['seed']} (the spread between seeds): validation loss max |Δ| "
                     f"{s['val_loss']['max_abs']:.4f}, final |Δ| "
                     f"{s['val_loss']['final_abs']:.4f} (its batches differ too, so its "
                     "training losses are not compared step by step)")
    for name, d in result.get("variants_vs_plain", {}).items():
        lines.append(f"Variant {name} {result['runs'][name]['backends']} vs plain: validation "
                     f"loss max |Δ| {d['val_loss']['max_abs']:.4f}, final |Δ| "
                     f"{d['val_loss']['final_abs']:.4f}; training loss mean |Δ| "
                     f"{d['train_loss']['mean_abs']:.4f} (final val "
                     f"{result['runs'][name]['val_loss'][d['val_loss']['final_step']]:.4f})")
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
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the preset's, as `moeflow train`)")
    p.add_argument("--rerun", action="store_true",
                   help="also train the plain run again from the same seed: the run-to-run "
                        "spread of a device whose kernels are not deterministic (GPU atomics)")
    p.add_argument("--baseline-seed", type=int, default=None,
                   help="also train the plain model from this seed (the seed-to-seed spread)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=field:value,...",
                   help="also train the plain run with these Backends fields fixed (e.g. "
                        "experts_ref=experts:reference), compared step by step with plain")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="directory for fp8_loss.json and fp8_loss.md")
    p.add_argument("--work", help="directory for the runs (metrics; default: a "
                                  "new temporary directory)")
    args = p.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    if {"plain", "fp8", "seed", "rerun"} & set(variants):
        p.error("--variant: plain, fp8, seed and rerun name the script's own runs")
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
    plain = result["runs"]["plain"]

    def against_plain(run: dict) -> dict:
        return {k: differences(plain, run, k) for k in ("train_loss", "val_loss")}

    result["fp8_vs_plain"] = against_plain(result["runs"]["fp8"])
    if args.baseline_seed is not None:
        result["runs"]["seed"] = train(args, "seed", False, args.baseline_seed)
        result["seed_vs_plain"] = against_plain(result["runs"]["seed"])
    if args.rerun:
        result["runs"]["rerun"] = train(args, "rerun", False, args.seed)
        result["rerun_vs_plain"] = against_plain(result["runs"]["rerun"])
    for name, backends in variants.items():
        result["runs"][name] = train(args, name, False, args.seed, backends)
    result["variants_vs_plain"] = {name: against_plain(result["runs"][name]) for name in variants}
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
