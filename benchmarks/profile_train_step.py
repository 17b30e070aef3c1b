"""Where a training step's time goes: the reproduce family's dense-S and moe-S under the profiler.

`moeflow reproduce` measured moe-S training at 219K tokens/s against dense-S's 1.05M on one H200
although moe-S's active FLOPs per token are dense-S's (top-1 experts of dense-S's width); this
script times steps of the real trainer loop (moeflow.train.trainer.Trainer.train_step, the loop
`moeflow train` runs) at the reproduce GPU scale and prints the profiler's top operators by
device and by host time, the host-device synchronisations, and the median step time.

    python benchmarks/profile_train_step.py --out $OUT/profile_train [--stages dense-S,moe-S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.data.prepared import DataSpec, prepare_dataset
from moeflow.reproduce.family import build_stages
from moeflow.reproduce.scale import get_scale
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="dense-S,moe-S")
    ap.add_argument("--scale", default="gpu")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after 4 warm-up steps)")
    ap.add_argument("--profiled", type=int, default=3, help="steps under the profiler")
    ap.add_argument("--data-mb", type=int, default=48)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = get_scale(args.scale)
    stages = build_stages(scale)
    data = out / "data"
    if not (data / "info.json").exists():
        spec = DataSpec(source=scale.data.source, vocab_size=scale.data.vocab_size,
                        max_bytes=args.data_mb << 20, tokenizer_sample_bytes=8 << 20)
        prepare_dataset(spec, data, log=lambda m: None)
    summary = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "stages": {}}
    for name in args.stages.split(","):
        stage = stages[name]
        cfg_path = out / f"{name}.json"
        stage.model.save(cfg_path)
        run = out / f"run-{name}"
        trainer = Trainer(TrainConfig(
            model_config=str(cfg_path), data=(str(data),), seq_len=scale.seq_len,
            steps=1000, batch_size=scale.batch_size, micro_batch=scale.micro_batch, lr=scale.lr,
            warmup_steps=scale.warmup_steps, seed=0, out=str(run), progress=False))
        trainer.prepare()
        losses = [trainer.train_step(step)["loss"] for step in range(1, 5)]
        sync()
        times = []
        for step in range(5, 5 + args.steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step(step)["loss"])
            sync()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for step in range(5 + args.steps, 5 + args.steps + args.profiled):
                trainer.train_step(step)
            sync()
        tokens = scale.batch_size * scale.seq_len
        med = statistics.median(times)
        by_device = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        by_host = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        syncs = {e.key: e.count for e in prof.key_averages()
                 if any(s in e.key for s in ("Synchronize", "item", "_local_scalar_dense",
                                             "cudaMemcpy", "nonzero"))}
        (out / f"{name}_by_device.txt").write_text(by_device)
        (out / f"{name}_by_host.txt").write_text(by_host)
        summary["stages"][name] = {"median_step_s": med, "tokens_per_s": tokens / med,
                                   "step_s": times, "losses": losses,
                                   "sync_like_ops_in_profiled_steps": syncs}
        print(f"== {name}: median step {med * 1e3:.1f} ms, {tokens / med:,.0f} tokens/s; "
              f"syncs in {args.profiled} steps: {syncs}")
        print(by_device)
        print(by_host)
        del trainer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
