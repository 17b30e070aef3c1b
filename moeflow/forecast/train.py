"""`moeflow forecast train`: fit a TimeMoE on the training parts of some series.

    moeflow forecast train --data co2 elnino sunspots --out runs/fc --steps 2000
    moeflow forecast train --data sales.csv --column units --period 12 --holdout 12 --out runs/s

The run directory --out must not exist or be empty (a run is never written over another's
files). Every series loses its last `holdout` points first (moeflow.forecast.data.
split_holdout): they are what `moeflow forecast eval` scores, and no training step reads them.
The longest training part must hold one whole window (context_len + the longest horizon
points), and each training part more than one seasonal period. Each step draws
`batch_size` random windows from what is left (moeflow.forecast.windows), standardises each by
its leading points, and minimises Huber + pinball over every head and position plus the
routers' balance loss (moeflow.forecast.loss) with AdamW, linear warmup and cosine decay
(moeflow.train.schedule). Seeded: the same config gives the same weights on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.forecast.config import ForecastModelConfig, ForecastTrainConfig
from moeflow.forecast.data import Series, check_period, load_series, split_holdout
from moeflow.forecast.loss import forecast_loss
from moeflow.forecast.model import TimeMoE
from moeflow.forecast.run import METRICS, check_out_dir, save_run
from moeflow.forecast.windows import WindowSampler
from moeflow.train.determinism import deterministic_on_cpu
from moeflow.train.metrics import MetricsWriter
from moeflow.train.schedule import lr_at


@dataclass(frozen=True)
class ForecastTrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float
    series: int

    def summary(self) -> str:
        return (f"trained {self.steps} steps on {self.series} series in {self.seconds:.1f}s, "
                f"final loss {self.final_loss:.4f}; run: {self.out}")


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(model: TimeMoE, cfg: ForecastTrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases or the 1-wide embedding rows)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(0.9, 0.95))


def check_context(train_parts: list[Series], series: list[Series],
                  model_config: ForecastModelConfig, holdout: int) -> None:
    """A window is context_len + the longest horizon points: the longest training part must
    hold one, or no window ever fills the context (every step would compute padding, and the
    heads at the positions a forecast reads would never be trained)."""
    i = max(range(len(train_parts)), key=lambda k: len(train_parts[k]))
    n, L, H = len(train_parts[i]), model_config.context_len, model_config.max_horizon
    if n < L + H:
        raise ValueError(f"context_len={L}: a training window is context_len + the longest "
                         f"horizon ({H}) = {L + H} points, but the longest training series "
                         f"{series[i].name!r} has {n} ({len(series[i])} less the holdout of "
                         f"{holdout}); pass a smaller --context-len"
                         f"{f' (at most {n - H})' if n > H else ''}, shorter --horizons or a "
                         f"shorter --holdout")


def train_forecaster(cfg: ForecastTrainConfig, model_config: ForecastModelConfig | None = None,
                     log=print) -> ForecastTrainResult:
    """Train and write the run directory cfg.out; `model_config` overrides the preset."""
    model_config = model_config or ForecastModelConfig.from_name(cfg.preset)
    out = Path(cfg.out)
    check_out_dir(out)
    series = load_series(cfg.data, cfg.column, cfg.period)
    train_parts = split_holdout(series, cfg.holdout, model_config.norm_len + 1)
    check_context(train_parts, series, model_config, cfg.holdout)
    for s, t in zip(series, train_parts):
        check_period(s, len(t), cfg.holdout, given=cfg.period is not None)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = TimeMoE(model_config).to(device)
    sampler = WindowSampler([s.values for s in train_parts], model_config, cfg.seed)
    opt = _optimizer(model, cfg)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(out / METRICS)
    t0 = time.perf_counter()
    loss_value = float("nan")
    try:
        with deterministic_on_cpu(device):
            model.train()
            for step in range(cfg.steps):
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = sampler.sample(cfg.batch_size)
                batch = type(batch)(batch.inputs_BL.to(device),
                                    tuple(t.to(device) for t in batch.targets),
                                    tuple(m.to(device) for m in batch.masks))
                out_ = model(batch.inputs_BL)
                loss = forecast_loss(out_, batch, model_config)
                opt.zero_grad(set_to_none=True)
                loss.total.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                row = {"step": step + 1, "loss": float(loss.total.detach()),
                       "huber": float(loss.huber.detach()),
                       "pinball": float(loss.pinball.detach()),
                       "aux_loss": float(loss.aux.detach()), "lr": lr}
                loss_value = row["loss"]
                if row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps:
                    metrics.write({**row, "expert_load": [r.counts_E.tolist()
                                                          for r in out_.routing]})
                if row["step"] % max(1, cfg.steps // 10) == 0 or row["step"] == cfg.steps:
                    log(f"step {row['step']}/{cfg.steps}  loss {row['loss']:.4f}  huber "
                        f"{row['huber']:.4f}  pinball {row['pinball']:.4f}  "
                        f"aux {row['aux_loss']:.3f}  lr {lr:.2e}")
    finally:
        metrics.close()
    seconds = time.perf_counter() - t0
    described = [{"name": s.name, "points": len(s), "period": s.period,
                  "trained_on": len(t)} for s, t in zip(series, train_parts)]
    save_run(out, model.cpu(), cfg, described)
    return ForecastTrainResult(out, cfg.steps, loss_value, seconds, len(series))
