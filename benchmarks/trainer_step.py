"""Wall time of `moeflow train`'s step: the Trainer itself (its data loader, fp32 weights under
bf16 autocast, loss, clipping, optimizer), not a benchmark's stand-in loop.

    PYTHONPATH=. python benchmarks/trainer_step.py OUT_DIR [--preset finegrained-1b]
        [--batch-size 4] [--vocab-size 4096]

Prepares a run as `moeflow train` does (the built-in corpus, a BPE tokenizer of --vocab-size,
the preset's model, seq len and lr), takes 3 warm-up steps, then reports (1) three steps each
followed by a device sync, (2) six steps back to back with one sync at the end, as the training
loop runs them (the optimizer's kernels of one step overlap the next step's host work), and the
tokens/s the trainer's own metrics rows give those six steps (a row's time ends at its step's
one host sync, which waits for the previous step's optimizer kernels too). (2) is the
throughput a run gets.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeflow.train import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="run directory (nothing is saved at the end)")
    p.add_argument("--preset", default="finegrained-1b")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("trainer_step.py times the CUDA trainer: no GPU here")
    trainer = Trainer(TrainConfig(preset=args.preset, steps=20, batch_size=args.batch_size,
                                  vocab_size=args.vocab_size, val_every=1000, val_batches=1,
                                  save_at_end=False, progress=False, out=args.out))
    trainer.prepare()
    flags = {k: v for k, v in trainer.optimizer.defaults.items() if k in ("fused", "foreach")}
    print("optimizer:", flags, "parameters:", next(trainer.model.parameters()).dtype, flush=True)
    for step in range(1, 4):
        trainer.train_step(step)
    torch.cuda.synchronize()
    synced = []
    for step in range(4, 7):
        start = time.perf_counter()
        trainer.train_step(step)
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - start)
    print("synced step wall ms:", [round(s * 1e3, 1) for s in synced], flush=True)
    start = time.perf_counter()
    rows = [trainer.train_step(step) for step in range(7, 13)]
    torch.cuda.synchronize()
    print("loop of 6 steps, one sync at the end, ms per step:",
          round((time.perf_counter() - start) / 6 * 1e3, 1),
          "; the rows' tokens_per_s:", [round(r["tokens_per_s"]) for r in rows], flush=True)


if __name__ == "__main__":
    main()
