"""Causal self-attention: multi-head (GPT) or grouped-query with RoPE (Llama), with a KV cache.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, G kv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import ModelConfig
from moeflow.model.norms import RMSNorm
from moeflow.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.attn_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.attn_bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache=None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTD).split([H * hd, G * hd, G * hd], dim=-1)
        q_BHTd = q.view(B, T, H, hd).transpose(1, 2)
        k_BGTd = k.view(B, T, G, hd).transpose(1, 2)
        v_BGTd = v.view(B, T, G, hd).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTd, k_BGTd = self.q_norm(q_BHTd), self.k_norm(k_BGTd)
        if rope is not None:
            q_BHTd, k_BGTd = apply_rope(q_BHTd, *rope), apply_rope(k_BGTd, *rope)

        offset = 0
        if cache is not None:
            offset = cache.length
            k_BGTd, v_BGTd = cache.update(self.layer_idx, k_BGTd, v_BGTd)
        S = k_BGTd.shape[2]
        mask, causal = None, False
        if T > 1 and offset == 0:
            causal = True
        elif T > 1:  # a chunk after cached tokens: query i sees keys <= offset + i
            q_pos = torch.arange(offset, offset + T, device=x_BTD.device)
            mask = torch.arange(S, device=x_BTD.device)[None, :] <= q_pos[:, None]
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=mask,
                                                is_causal=causal, enable_gqa=G != H)
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, H * hd))
