"""What a forecaster is and how a run trains and evaluates it: frozen, validated configs.

`ForecastModelConfig` is the network (Time-MoE's shape at small scale): a decoder-only stack of
moeflow blocks in the Llama family (RMSNorm, RoPE, causal attention) whose FFNs are MoE layers
with a sigmoid-gated shared expert, as Time-MoE has, over point-wise value embeddings; one
output head per horizon in `horizons`, trained jointly. `decoder_config()` is the ModelConfig
those blocks are built from, so the forecaster runs moeflow's own attention, router, dispatcher
and experts. Presets: FORECAST_PRESETS, by `from_name`.

`ForecastTrainConfig` (`moeflow forecast train`), `PredictConfig` (`predict`) and `EvalConfig`
(`eval`) are the run configs; each field is one command-line flag (moeflow.cli generates them).
Invalid values raise `ValueError` naming the field and the value, at construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moeflow.config import ModelConfig, RouterConfig
from moeflow.validate import check, choice, integer, number, option

DEVICES = ("auto", "cpu", "cuda")
BASELINES = ("seasonal_naive", "arima", "ets")


@dataclass(frozen=True)
class ForecastModelConfig:
    """context_len: the most past points one forecast reads. norm_len: each window is scaled by
    the mean and standard deviation of its first norm_len points (moeflow.forecast.windows says
    why those and not the whole window), so a window needs at least norm_len points.
    horizons: one head per entry, head h predicts the next h points from every position.
    quantiles: levels of the interval heads (besides the point head), trained with the pinball
    loss. huber_delta: the point head's Huber threshold (Time-MoE uses 2)."""

    name: str = "custom"
    d_model: int = option("model width", default=64)
    n_layers: int = option("decoder blocks", default=2)
    n_heads: int = option("attention heads", default=4)
    num_experts: int = option("routed experts per MoE layer", default=4)
    top_k: int = option("experts per point", default=2)
    expert_d_ff: int = option("each routed expert's hidden width", default=128)
    shared_d_ff: int = option("the shared expert's hidden width (0 = none)", default=128)
    context_len: int = option("past points one forecast reads", default=128)
    norm_len: int = option("leading points of a window that set its scale", default=32)
    horizons: tuple[int, ...] = option("one forecasting head per horizon", default=(1, 8, 32))
    quantiles: tuple[float, ...] = option("interval heads' quantile levels", default=(0.1, 0.9))
    huber_delta: float = option("Huber loss threshold of the point head", default=2.0)
    aux_loss_coef: float = option("router load-balancing loss coefficient", default=0.02)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("horizons", "quantiles"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_d_ff",
                     "context_len", "norm_len"):
            integer(name, getattr(self, name), lo=1)
        integer("shared_d_ff", self.shared_d_ff, lo=0)
        check(self.top_k <= self.num_experts, "top_k", self.top_k,
              f"must be <= num_experts={self.num_experts}")
        check(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0,
              "d_model", self.d_model, f"must be n_heads={self.n_heads} × an even head dim")
        check(self.norm_len <= self.context_len, "norm_len", self.norm_len,
              f"must be <= context_len={self.context_len}")
        check(isinstance(self.horizons, tuple) and len(self.horizons) > 0, "horizons",
              self.horizons, "must be a non-empty list")
        for h in self.horizons:
            integer("horizons", h, lo=1)
        check(list(self.horizons) == sorted(set(self.horizons)), "horizons", self.horizons,
              "must be increasing")
        check(isinstance(self.quantiles, tuple), "quantiles", self.quantiles, "must be a list")
        for q in self.quantiles:
            number("quantiles", q, lo=0, hi=1, lo_open=True, hi_open=True)
        check(list(self.quantiles) == sorted(set(self.quantiles)), "quantiles", self.quantiles,
              "must be increasing")
        number("huber_delta", self.huber_delta, lo=0, lo_open=True)
        number("aux_loss_coef", self.aux_loss_coef, lo=0)
        number("init_std", self.init_std, lo=0, lo_open=True)

    @property
    def max_horizon(self) -> int:
        return self.horizons[-1]

    @property
    def channels(self) -> int:
        """Outputs per forecast step: the point, then one per quantile."""
        return 1 + len(self.quantiles)

    def decoder_config(self) -> ModelConfig:
        """The moeflow decoder whose blocks the forecaster stacks (its vocabulary is unused:
        values enter through the forecaster's own embedding). Routing is dropless: a point's
        forecast must not depend on which other points share its batch."""
        router = RouterConfig(top_k=self.top_k, dropless=True, eval_capacity_factor=None,
                              aux_loss_coef=self.aux_loss_coef)
        return ModelConfig(
            name=f"forecast-{self.name}", arch="llama", vocab_size=1, n_layers=self.n_layers,
            d_model=self.d_model, n_heads=self.n_heads,
            max_seq_len=self.context_len, init_std=self.init_std,
            ffn_layout=(f"moe:{self.num_experts}",) * self.n_layers,
            expert_d_ff=self.expert_d_ff, num_shared_experts=1 if self.shared_d_ff else 0,
            shared_d_ff=self.shared_d_ff, shared_expert_gate=bool(self.shared_d_ff),
            router=router)

    def replace(self, **changes: Any) -> "ForecastModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["horizons"], d["quantiles"] = list(self.horizons), list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ForecastModelConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown forecast model field {unknown[0]!r}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> "ForecastModelConfig":
        if name not in FORECAST_PRESETS:
            raise ValueError(f"unknown forecast preset {name!r}; known presets: "
                             f"{', '.join(FORECAST_PRESETS)}")
        return cls.from_dict({"name": name, **FORECAST_PRESETS[name]})


# Plain data, as moeflow.presets. "tiny": the CI test's model (trains in seconds on 2 cores);
# "small": the benchmark's (benchmarks/forecast.py).
FORECAST_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, expert_d_ff=64,
                 shared_d_ff=64, context_len=64, norm_len=16, horizons=(1, 4, 12)),
    "small": dict(d_model=64, n_layers=3, n_heads=4, num_experts=8, top_k=2, expert_d_ff=128,
                  shared_d_ff=128, context_len=128, norm_len=32, horizons=(1, 8, 32)),
}


@dataclass(frozen=True)
class DataOptions:
    """Which series a command reads (shared by train, predict and eval)."""

    data: tuple[str, ...] = option(
        "statsmodels datasets (sunspots, nile, co2, elnino, macrodata) or CSV files",
        metavar="NAME_OR_CSV", default=())
    column: tuple[str, ...] = option(
        "columns to read (default: every numeric column; for macrodata every series)",
        metavar="NAME", default=())
    period: int | None = option("seasonal period for seasonal-naive and MASE (default: the "
                                "dataset's; 1 for a CSV)", default=None)

    def __post_init__(self) -> None:
        for name in ("data", "column"):
            value = getattr(self, name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, name, tuple([value] if isinstance(value, str)
                                                     else value))
        integer("period", self.period, lo=1, optional=True)


@dataclass(frozen=True)
class ForecastTrainConfig(DataOptions):
    preset: str = option("forecast model preset (tiny, small)", default="small")
    holdout: int = option("points at the end of every series never trained on (eval's tail)",
                          default=24)
    steps: int = option("optimizer steps", default=1000)
    batch_size: int = option("windows per step", default=32)
    lr: float = option("peak learning rate (linear warmup, cosine decay)", default=1e-3)
    warmup_steps: int | None = option("warmup steps (default: steps/10)", default=None)
    min_lr_ratio: float = option("cosine decay floor as a fraction of --lr", default=0.1)
    weight_decay: float = option("AdamW weight decay (matrices only)", default=0.1)
    grad_clip: float = option("clip the gradient norm to this (0 = off)", default=1.0)
    seed: int = option("seeds weights and window sampling", default=0)
    log_every: int = option("metrics.jsonl row every N steps", default=10)
    out: str = option("run directory, new or empty: forecast.json, model.safetensors, "
                      "metrics.jsonl", default="runs/forecast")
    device: str = option("where to train", choices=DEVICES, default="auto")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.data) > 0, "data", self.data, "name at least one dataset or CSV file")
        if self.warmup_steps is None and isinstance(self.steps, int):
            object.__setattr__(self, "warmup_steps", self.steps // 10)
        for name in ("holdout", "steps", "batch_size", "log_every"):
            integer(name, getattr(self, name), lo=1)
        integer("warmup_steps", self.warmup_steps, lo=0, hi=self.steps)
        integer("seed", self.seed, lo=0)
        number("lr", self.lr, lo=0, lo_open=True)
        number("min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        number("weight_decay", self.weight_decay, lo=0)
        number("grad_clip", self.grad_clip, lo=0)
        choice("device", self.device, DEVICES)
        check(bool(self.out), "out", self.out, "must name a directory")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"], d["column"] = list(self.data), list(self.column)
        return d


@dataclass(frozen=True)
class PredictConfig(DataOptions):
    run: str = option("a `moeflow forecast train` run directory", kw_only=True)
    horizon: int = option("points to forecast past the end of each series (at most the "
                          "model's context_len)", default=24)
    out: str | None = option("write the CSV here, a new file (default: print it)",
                             default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("horizon", self.horizon, lo=1)


@dataclass(frozen=True)
class EvalConfig(DataOptions):
    run: str = option("a `moeflow forecast train` run directory", kw_only=True)
    holdout: int | None = option("tail length to evaluate on (default: the run's holdout)",
                                 default=None)
    horizon: int | None = option("points per forecast (default: the whole tail)", default=None)
    stride: int | None = option("points between forecast origins inside the tail (default: "
                                "the horizon)", default=None)
    baselines: tuple[str, ...] = option("baselines to compare with", choices=BASELINES,
                                        default=BASELINES)
    out: str | None = option("directory for eval.json and forecast plots, new or empty "
                             "(default: RUN/eval)", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.baselines, (str, list)):
            object.__setattr__(self, "baselines", tuple(
                [self.baselines] if isinstance(self.baselines, str) else self.baselines))
        for name in ("holdout", "horizon", "stride"):
            integer(name, getattr(self, name), lo=1, optional=True)
        for b in self.baselines:
            choice("baselines", b, BASELINES)
