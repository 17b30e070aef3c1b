"""The AdamW step of `moeflow train`, timed on a model's parameters, next to torch's other
implementations.

    PYTHONPATH=. python benchmarks/optimizer_step.py [--preset finegrained-1b] [--out FILE]

The model is built as the Trainer builds it (fp32 parameters: the trainer runs bf16 autocast
over fp32 weights) with random gradients; every variant's optimizer gets the same parameter
groups (weight decay on matrices only, moeflow.train.Trainer.param_groups) and the run's
settings (the preset's lr, the betas): torch.optim.AdamW with `foreach=True` (torch's default
on CUDA, and the trainer's before session 29), "trainer" = Trainer.build_optimizer (what a run
uses), torch.optim.AdamW with `fused=True`. Each variant: 2 warm-up steps, then the median of 10
steps timed with CUDA events; the bytes an AdamW step must move (fp32: read parameter,
gradient and both moments, write parameter and moments: 28 bytes a parameter) over that time
give its rate. After the timed steps the variants' parameters are compared with "foreach"'s
(the same gradients and steps: only rounding differs).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from moeflow import ModelConfig, Transformer
from moeflow.train import TrainConfig, Trainer


def _time_steps(opt: torch.optim.Optimizer, steps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="finegrained-1b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("optimizer_step.py times CUDA optimizers: no GPU here")
    trainer = Trainer(TrainConfig(preset=args.preset))
    trainer.device = torch.device("cuda")  # what Trainer.prepare resolves on a GPU machine
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_name(args.preset))
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
    start = [p.detach().clone() for p in params]
    numel = sum(p.numel() for p in params)
    cfg = trainer.cfg  # the run's lr (the preset's recipe), betas and eps for every variant
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # fresh parameter groups for each (an optimizer writes its defaults into the group dicts)
    variants = {"foreach": lambda: torch.optim.AdamW(trainer.param_groups(model), foreach=True,
                                                     **kwargs),
                "trainer": lambda: trainer.build_optimizer(model),
                "fused": lambda: torch.optim.AdamW(trainer.param_groups(model), fused=True,
                                                   **kwargs)}
    result = {"preset": args.preset, "params": numel, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "variants": {}}
    reference = None  # foreach's parameters after its steps (one copy: a 4.6 B model's is 18 GB)
    for name, build in variants.items():
        for p, p0 in zip(params, start):
            p.data.copy_(p0)
        opt = build()
        ms = statistics.median(_time_steps(opt, args.steps))
        if reference is None:
            reference = [p.detach().clone() for p in params]
        diff = max(float((p.detach() - r).abs().max()) for p, r in zip(params, reference))
        result["variants"][name] = {"ms": ms, "TBps": 28 * numel / ms / 1e9,
                                    "class": type(opt).__name__,
                                    "flags": {k: v for k, v in opt.defaults.items()
                                              if isinstance(v, (bool, type(None)))},
                                    "max_abs_diff_vs_foreach": diff}
        print(f"{name}: {ms:.2f} ms ({28 * numel / ms / 1e9:.2f} TB/s), "
              f"max |diff| vs foreach {diff:.2e}", flush=True)
        del opt
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
