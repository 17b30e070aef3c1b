"""`moeflow demo`: the main job in one command, on a laptop-class CPU in about three minutes.

Trains the `tiny` PR-MoE (Residual-MoE layers with 4 then 8 experts) on the source files of the
running Python's standard library, so nothing is downloaded: the BPE tokenizer is trained on the
training split, the model trains for DEMO["steps"] steps, and the demo prints the validation loss
before and after, each MoE layer's expert loads, and a sample from the trained model (generated
through the serving engine, as `moeflow generate` and `moeflow serve` do).

The demo's settings live in DEMO and SAMPLE below and nowhere else; the run goes to a fresh
temporary directory unless --out is given, so running the demo twice overwrites nothing. The
demo always trains from scratch: an --out that already holds files is refused (a demo run is
trained further with `moeflow train --out DIR --resume --steps N`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeflow.infer.engine import Engine, EngineConfig
from moeflow.infer.sampling import SamplingParams
from moeflow.infer.text import generate_text
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer
from moeflow.validate import integer

DEMO = dict(preset="tiny", steps=600, batch_size=16, lr=3e-3, warmup_steps=30, val_every=150,
            val_batches=16, seed=0)
SAMPLE = dict(prompt="def ", params=SamplingParams(max_new_tokens=96, temperature=0.8,
                                                    top_k=40, seed=0))


@dataclass(frozen=True)
class DemoResult:
    val_before: float
    val_after: float
    expert_load: list[list[int]]
    moe_layers: list[int]
    sample: str
    out: str
    seconds: float


def expert_load_table(moe_layers: list[int], loads: list[list[int]]) -> Table:
    table = Table(title="expert load at the last validation (share of the layer's assignments)")
    table.add_column("layer", justify="right")
    table.add_column("experts", justify="right")
    table.add_column("share per expert (%)")
    table.add_column("max / mean", justify="right")
    for layer, counts in zip(moe_layers, loads):
        total = max(sum(counts), 1)
        shares = [100 * c / total for c in counts]
        imbalance = max(counts) / (total / len(counts))
        table.add_row(str(layer), str(len(counts)), " ".join(f"{s:4.1f}" for s in shares),
                      f"{imbalance:.2f}")
    return table


def run_demo(steps: int | None = None, out: str | None = None,
             console: Console | None = None) -> DemoResult:
    integer("steps", steps, lo=1, optional=True)
    console = console or Console()
    start = time.perf_counter()
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        what = "a training run" if (Path(out) / "run.json").exists() else "other files"
        raise ValueError(f"--out {out!r} already holds {what}; the demo trains from scratch "
                         f"into a new or empty directory (to train a run further: moeflow train "
                         f"--out {out} --resume --steps N)")
    out = out or tempfile.mkdtemp(prefix="moeflow-demo-")
    # A shorter run scales its schedule in the same construction (TrainConfig validates
    # warmup_steps <= steps, so the demo's 30 warm-up steps cannot come first); runs of under
    # 40 steps validate only before and after (each validation costs several steps' time).
    short = dict(steps=steps, val_every=max(10, steps // 4) if steps >= 40 else steps,
                 warmup_steps=min(DEMO["warmup_steps"], steps // 10)) if steps is not None else {}
    cfg = TrainConfig(**{**DEMO, "out": out, **short})
    trainer = Trainer(cfg)
    console.print(f"[bold]moeflow demo[/]: training the `{cfg.preset}` PR-MoE on the Python "
                  f"standard library's source, {cfg.steps} steps of {cfg.batch_size} sequences, "
                  f"into {out}", highlight=False)
    trainer.prepare()
    console.print(f"data ready in {time.perf_counter() - start:.1f}s: "
                  f"{trainer.train_data.tokens.numel():,} training tokens, BPE vocabulary "
                  f"{trainer.tokenizer.vocab_size}", highlight=False)
    result = trainer.run()
    before, after = result.val_losses[0][1], result.val_losses[-1][1]
    console.print(f"\nvalidation loss: {before:.3f} before training → {after:.3f} after "
                  f"({trainer.tokens_seen:,} tokens)", highlight=False)
    console.print(expert_load_table(result.moe_layers, result.expert_load))
    params = replace(SAMPLE["params"], stop_token_ids=trainer.tokenizer.eos_ids)
    engine = Engine(trainer.model, EngineConfig(max_batch_size=1))
    sample = generate_text(engine, trainer.tokenizer, SAMPLE["prompt"], params)
    console.print("\nsample (temperature 0.8, top-k 40):", highlight=False)
    console.print(SAMPLE["prompt"] + sample, markup=False, highlight=False)
    seconds = time.perf_counter() - start
    console.print(f"\ndone in {seconds:.0f}s; checkpoint in {result.checkpoint}; try\n"
                  f"  moeflow generate --checkpoint {out} --prompt 'import '\n"
                  f"  moeflow plot {out}", highlight=False)
    return DemoResult(before, after, result.expert_load, result.moe_layers, sample, out, seconds)
