"""How big a reproduction is: one frozen `Scale` per named preset ("gpu", "smoke").

A scale fixes everything the stages share — the data, the tokenizer, the sequence length, the
token budget, the schedule and the seed — and the sizes of the model family (moeflow.reproduce.
family). Every stage trains with the same schedule on the same windows in the same order, so
the models differ only in their architecture.

"gpu" took 14 minutes end to end on one H200 (benchmarks/results/reproduce/: 32.8 M tokens per
stage; benchmarks/reproduce_calibrate.py measured the rates it was sized from); "smoke" runs every
stage for a handful of steps on 2 CPU cores in about a minute, to check the machinery (CI), not
the claims.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.data.prepared import DataSpec


@dataclass(frozen=True)
class Scale:
    name: str
    data: DataSpec
    # the family (moeflow.reproduce.family)
    n_layers: int  # dense-S/M/L, moe-S, pr-moe-S; the students have student_layers
    student_layers: int
    widths: tuple[int, int, int]  # d_model of S, M, L
    head_dim: int
    experts: int  # moe-S: experts in every MoE layer
    pyramid: tuple[int, int]  # pr-moe-S: experts in the first / last half of its MoE layers
    seq_len: int
    # the schedule, shared by every stage
    steps: int
    batch_size: int
    micro_batch: int | None
    lr: float
    warmup_steps: int
    val_every: int
    val_batches: int
    kd_alpha: float
    kd_stop_fraction: float  # staged KD: the distillation term stops after this share of steps
    # the final evaluation and the inference leg
    eval_windows: int  # validation windows of the final evaluation
    prefill_tokens: int
    decode_batches: tuple[int, ...]
    decode_steps: int  # timed decode steps per batch size
    seed: int = 0
    min_lr_ratio: float = 0.1
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.student_layers < self.n_layers:
            raise ValueError(f"student_layers={self.student_layers}: must be in (0, n_layers)")
        if self.prefill_tokens + self.decode_steps + 8 > self.seq_len:
            raise ValueError("prefill_tokens + decode_steps must fit in seq_len")

    @property
    def tokens_per_stage(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


SCALES: dict[str, Scale] = {
    "gpu": Scale(
        name="gpu",
        data=DataSpec(source=("builtin:interpreter",), vocab_size=8192, val_fraction=0.02,
                      max_bytes=800 << 20, tokenizer_sample_bytes=48 << 20),
        n_layers=8, student_layers=6, widths=(256, 384, 576), head_dim=64,
        experts=32, pyramid=(8, 16), seq_len=1024,
        steps=1000, batch_size=32, micro_batch=None, lr=1e-3, warmup_steps=50,
        val_every=50, val_batches=4, kd_alpha=1.0, kd_stop_fraction=0.5,
        eval_windows=256, prefill_tokens=512, decode_batches=(1, 32), decode_steps=64,
    ),
    "smoke": Scale(
        name="smoke",
        data=DataSpec(source=("builtin:interpreter",), vocab_size=384, val_fraction=0.05,
                      max_bytes=1 << 20, tokenizer_sample_bytes=256 << 10),
        n_layers=4, student_layers=3, widths=(32, 48, 64), head_dim=16,
        experts=4, pyramid=(2, 4), seq_len=48,
        steps=6, batch_size=4, micro_batch=None, lr=3e-3, warmup_steps=1,
        val_every=3, val_batches=2, kd_alpha=1.0, kd_stop_fraction=0.5,
        eval_windows=8, prefill_tokens=24, decode_batches=(1, 4), decode_steps=4,
    ),
}


def get_scale(name: str) -> Scale:
    try:
        return SCALES[name]
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}") from None
