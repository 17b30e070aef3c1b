"""The model family of a reproduction, scaled down from the DeepSpeed-MoE paper's.

Paper → here (every model GPT style: LayerNorm, GELU MLP of width 4d, learned positions, tied
embeddings; MoE layers top-1 with capacity factor 1.0, min capacity 4, aux-loss coefficient 0.01,
token dropping in training; validation and serving route dropless):

  350M dense (24 layers, d 1024)      dense-S   n_layers, d = widths[0]
  (between)                           dense-M   d = widths[1]
  1.3B dense (same depth, 2× width)   dense-L   d = widths[2]: ≈ 4-5× dense-S's parameters
  350M+MoE-128                        moe-S     dense-S + `experts` experts on every other layer
  350M+PR-MoE-32/64                   pr-moe-S  Residual-MoE layers, pyramid[0] experts in the
                                                first half of the MoE layers, pyramid[1] after
  350M MoS (21 of 24 layers)          mos-S     pr-moe-S with student_layers, trained with the
                                                teacher's soft labels until kd_stop_fraction of
                                                the steps (staged KD); the same student with KD
                                                throughout and without KD are stages too.

Why 32 experts for moe-S at the gpu scale: with 32 K tokens per step an expert sees ~1 K rows
per step (so its GEMMs are not launch-bound) and tens of millions of tokens over the run; 64
would halve both for a model that already has 8× dense-S's parameters. The pyramid 8/16 keeps
the paper's ratios (PR-MoE-32/64 against MoE-128: a quarter, then half, of the experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.config import ModelConfig, RouterConfig
from moeflow.reproduce.scale import Scale

STAGES = ("dense-S", "dense-M", "dense-L", "moe-S", "pr-moe-S",
          "mos-S", "mos-S-kd-always", "mos-S-no-kd")
TEACHER = "pr-moe-S"
ROUTER = RouterConfig(top_k=1, capacity_factor=1.0, eval_capacity_factor=None, min_capacity=4,
                      aux_loss_coef=0.01)


@dataclass(frozen=True)
class Stage:
    name: str
    model: ModelConfig
    kd: str | None  # "staged" | "always" | None (no teacher)
    description: str

    @property
    def teacher(self) -> str | None:
        return TEACHER if self.kd else None


def _gpt(scale: Scale, name: str, d_model: int, n_layers: int, **moe) -> ModelConfig:
    return ModelConfig(name=name, arch="gpt", vocab_size=scale.data.vocab_size,
                       n_layers=n_layers, d_model=d_model, n_heads=d_model // scale.head_dim,
                       max_seq_len=scale.seq_len, router=ROUTER, **moe)


def _pyramid(scale: Scale, n_layers: int) -> dict:
    """Residual-MoE on every other layer; the last half (at least the last, for a teacher's
    count of late layers) of the MoE layers get the larger expert count."""
    n_moe = len(range(1, n_layers, 2))
    n_late = len(range(1, scale.n_layers, 2)) // 2
    early, late = scale.pyramid
    return dict(moe_kind="residual_moe", moe_every=2,
                num_experts=(early,) * (n_moe - n_late) + (late,) * n_late)


def build_stages(scale: Scale) -> dict[str, Stage]:
    s, m, large = scale.widths
    L, Ls = scale.n_layers, scale.student_layers
    student = _gpt(scale, "mos-S", s, Ls, **_pyramid(scale, Ls))
    stages = [
        Stage("dense-S", _gpt(scale, "dense-S", s, L), None, "GPT, the paper's 350M scaled down"),
        Stage("dense-M", _gpt(scale, "dense-M", m, L), None, "GPT, between S and L"),
        Stage("dense-L", _gpt(scale, "dense-L", large, L), None,
              "GPT, the quality-equivalent dense model (the paper's 1.3B)"),
        Stage("moe-S", _gpt(scale, "moe-S", s, L, moe_every=2, num_experts=scale.experts), None,
              f"dense-S + {scale.experts} top-1 experts on every other layer (+MoE-128)"),
        Stage("pr-moe-S", _gpt(scale, "pr-moe-S", s, L, **_pyramid(scale, L)), None,
              f"Pyramid-Residual-MoE {scale.pyramid[0]}/{scale.pyramid[1]}"),
        Stage("mos-S", student, "staged",
              f"Mixture-of-Students: pr-moe-S with {Ls} of {L} layers, staged KD"),
        Stage("mos-S-kd-always", student.replace(name="mos-S-kd-always"), "always",
              "the same student, KD throughout"),
        Stage("mos-S-no-kd", student.replace(name="mos-S-no-kd"), None,
              "the same student, no KD"),
    ]
    assert tuple(st.name for st in stages) == STAGES
    return {st.name: st for st in stages}
