"""Multi-head latent attention (DeepSeek-V2/V3).

Keys and values are expanded from a shared low-rank latent c = RMSNorm(W_a x) by W_b; each
head's key is [k_nope | k_rope] where k_rope is one rotary key shared by every head, and queries
come either from a full projection or from their own low-rank path (q_lora_rank > 0). Scores use
the scale 1/sqrt(qk_nope + qk_rope), as in DeepSeek's reference without YaRN.

This version caches the expanded per-head keys and values (kv_shape = H heads of qk_head_dim /
v_head_dim dims), so it plugs into the same cache protocol as `Attention`; caching the latent
alone (DeepSeek's memory saving) is not done here.

Shapes: B batch, T tokens, H heads, R kv latent rank, dn/dr nope/rope dims, dv value dims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeflow.config import ModelConfig
from moeflow.model.attention import sdpa
from moeflow.model.linear import project
from moeflow.model.norms import RMSNorm
from moeflow.model.rope import apply_rope
from moeflow.model.sliced import part, row_parallel
from moeflow.ops.backend import Backends, ChoosesBackends

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.parallel.tensor import TensorSlice

# DeepSeek's reference normalises the low-rank latents with this fixed epsilon.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module, ChoosesBackends):
    """`tp`: this rank's share of a tensor-parallel group (moeflow.parallel.tensor): it then
    holds n_heads/tp heads (the per-head query and key/value expansions, the output
    projection's matching columns); the latent projections stay whole. None: all heads."""

    def __init__(self, config: ModelConfig, layer_idx: int, backends: Backends = Backends(),
                 tp: TensorSlice | None = None) -> None:
        super().__init__()
        m = config.mla
        self.layer_idx = layer_idx
        self.backends = backends
        self.tp = tp
        self.n_heads, self.mla = part(config.n_heads, tp, "n_heads"), m
        self.rope_interleave = config.rope_interleave
        H, D = self.n_heads, config.d_model
        Hg = config.n_heads
        q_out = (0, (Hg * m.qk_head_dim,))
        self.tp_splits = {"q_b_proj.weight" if m.q_lora_rank else "q_proj.weight": q_out,
                          "kv_b_proj.weight": (0, (Hg * (m.qk_nope_head_dim + m.v_head_dim),)),
                          "proj.weight": (1, (Hg * m.v_head_dim,))}
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, backends)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * m.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, backends)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim),
                                   bias=False)
        self.proj = nn.Linear(H * m.v_head_dim, D, bias=config.attn_out_bias)

    def kv_shape(self) -> tuple[int, int, int]:
        return self.n_heads, self.mla.qk_head_dim, self.mla.v_head_dim

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache=None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        m, H = self.mla, self.n_heads
        dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        mm = self.backends.matmul
        if m.q_lora_rank:
            q = project(self.q_b_proj, self.q_a_norm(project(self.q_a_proj, x_BTD, mm)), mm)
        else:
            q = project(self.q_proj, x_BTD, mm)
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        c_BTR, k_rope = project(self.kv_a_proj, x_BTD, mm).split([m.kv_lora_rank, dr], dim=-1)
        kv = project(self.kv_b_proj, self.kv_a_norm(c_BTR), mm).view(B, T, H, dn + dv
                                                                     ).transpose(1, 2)
        k_nope, v_BHTd = kv.split([dn, dv], dim=-1)
        fuse = self.backends.fuse
        q_rope = apply_rope(q_rope, *rope, interleave=self.rope_interleave, fuse=fuse)
        k_rope = apply_rope(k_rope.view(B, 1, T, dr), *rope, interleave=self.rope_interleave,
                            fuse=fuse)
        q_BHTd = torch.cat([q_nope, q_rope], dim=-1)
        k_BHTd = torch.cat([k_nope, k_rope.expand(B, H, T, dr)], dim=-1)
        if cache is None:
            y_BHTd = sdpa(q_BHTd, k_BHTd, v_BHTd, causal=T > 1)
        else:
            y_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BHTd, v_BHTd)
        return row_parallel(self.proj, y_BHTd.transpose(1, 2).reshape(B, T, H * dv), self.tp, mm)
