"""Causal self-attention: multi-head (GPT) or grouped-query with RoPE (Llama), with a KV cache.

The module computes queries, keys and values (with the optional q/k norms and RoPE) and hands
"store the new keys/values and attend over everything cached" to the cache object, because only
the cache knows where each sequence's earlier keys live and which positions each query may see
(the serving engine's slot cache, moeflow.infer.slot_cache, has a view for prefill and one for
batched decode). Where the q/k norm + RoPE kernel runs, the cache may ask it to store the keys
and values itself (kv_slot_write: the captured prefill into a slot), and then only attends.
Without a cache it is plain causal attention over the input.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, G kv heads, hd head dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import ModelConfig
from moeflow.model.linear import project
from moeflow.model.norms import RMSNorm, rms_norm
from moeflow.model.rope import apply_rope
from moeflow.model.sliced import part, row_parallel
from moeflow.ops.backend import Backends, ChoosesBackends, resolve_elementwise_backend
from moeflow.ops.fused import fused

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.parallel.tensor import TensorSlice


def sdpa(q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
         mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads; `mask` is True where allowed."""
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask,
                                          is_causal=causal and mask is None,
                                          enable_gqa=k_BGSd.shape[1] != q_BHTd.shape[1])


@fused
def prepare_qk(q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, q_norm_w: torch.Tensor | None,
               k_norm_w: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
               sin: torch.Tensor | None, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of queries and keys (Qwen3; skipped when the weights are None), then
    RoPE (skipped when cos is None). One function so that inference on CUDA fuses it whole."""
    if q_norm_w is not None:
        q_BHTd, k_BGTd = rms_norm.reference(q_BHTd, q_norm_w, eps), \
            rms_norm.reference(k_BGTd, k_norm_w, eps)
    if cos is not None:
        q_BHTd = apply_rope.reference(q_BHTd, cos, sin, interleave)
        k_BGTd = apply_rope.reference(k_BGTd, cos, sin, interleave)
    return q_BHTd, k_BGTd


class Attention(nn.Module, ChoosesBackends):
    """`tp`: this rank's share of a tensor-parallel group (moeflow.parallel.tensor): it then
    holds n_heads/tp query and n_kv_heads/tp key/value heads and all-reduces the output
    projection's partial sums. None: all heads."""

    def __init__(self, config: ModelConfig, layer_idx: int, backends: Backends = Backends(),
                 tp: TensorSlice | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.backends = backends
        self.tp = tp
        self.n_heads = part(config.n_heads, tp, "n_heads")
        self.n_kv_heads = part(config.n_kv_heads, tp, "n_kv_heads")
        self.head_dim = config.head_dim
        self.rope_interleave = config.rope_interleave
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.attn_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model,
                              bias=config.attn_out_bias)
        # "head": one RMSNorm over each head's dims (Qwen3); "full": over the whole projection
        # (OLMoE).
        self.full_qk_norm = config.qk_norm and config.qk_norm_scope == "full"
        if self.full_qk_norm and tp is not None:
            raise ValueError("qk_norm_scope='full' normalises over every head at once, which "
                             "tensor slicing does not support")
        hd, H, G = config.head_dim, config.n_heads, config.n_kv_heads
        # Global section sizes of the sliced tensors (moeflow.parallel.tensor).
        self.tp_splits = {"qkv.weight": (0, (H * hd, G * hd, G * hd)),
                          "qkv.bias": (0, (H * hd, G * hd, G * hd)),
                          "proj.weight": (1, (H * hd,))}
        q_dim = self.n_heads * self.head_dim if self.full_qk_norm else self.head_dim
        k_dim = self.n_kv_heads * self.head_dim if self.full_qk_norm else self.head_dim
        self.q_norm = RMSNorm(q_dim, config.norm_eps, backends) if config.qk_norm else None
        self.k_norm = RMSNorm(k_dim, config.norm_eps, backends) if config.qk_norm else None

    def kv_shape(self) -> tuple[int, int, int]:
        """(kv heads, key dim, value dim) of what this layer stores per cached token."""
        return self.n_kv_heads, self.head_dim, self.head_dim

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache=None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = project(self.qkv, x_BTD, self.backends.matmul)
        q, k, v = qkv.split([H * hd, G * hd, G * hd], dim=-1)
        if self.full_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTd = q.view(B, T, H, hd).transpose(1, 2)
        k_BGTd = k.view(B, T, G, hd).transpose(1, 2)
        v_BGTd = v.view(B, T, G, hd).transpose(1, 2)
        head_norm = self.q_norm is not None and not self.full_qk_norm
        cos, sin = rope if rope is not None else (None, None)
        qk_args = (q_BHTd, k_BGTd, self.q_norm.weight if head_norm else None,
                   self.k_norm.weight if head_norm else None,
                   self.q_norm.eps if head_norm else 0.0, cos, sin, self.rope_interleave)
        kv_write = None  # set when the q/k kernel also stores k and v into the cache
        qk_prep = None  # set when the decode attention kernel norms and rotates q and k itself
        # Whether the cache view runs the decode attention kernel (which can prepare q/k).
        decode_kernel = cache is not None and cache.prepares_qk(q_BHTd)
        if head_norm or cos is not None:
            if resolve_elementwise_backend(self.backends.elementwise, q_BHTd) == "triton":
                if decode_kernel and not self.rope_interleave:
                    from moeflow.ops.decode_attention_triton import QKPrep, prepares
                    if prepares(hd):
                        qk_prep = QKPrep(*qk_args[2:4], qk_args[4],
                                         None if cos is None else cos[:, -1].expand(B, hd),
                                         None if sin is None else sin[:, -1].expand(B, hd))
                if qk_prep is None:
                    from moeflow.ops.qk_rope_triton import qk_norm_rope_triton
                    if cache is not None:
                        kv_write = cache.kv_slot_write(self.layer_idx, q_BHTd, v_BGTd)
                    q_BHTd, k_BGTd = qk_norm_rope_triton(*qk_args, kv_write=kv_write)
            else:
                q_BHTd, k_BGTd = prepare_qk(*qk_args, fuse=self.backends.fuse)
        if cache is None:
            y_BHTd = sdpa(q_BHTd, k_BGTd, v_BGTd, causal=T > 1)
        elif kv_write is not None:
            y_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd, kv_written=True)
        elif qk_prep is not None:
            y_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd, qk=qk_prep)
        else:
            y_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd)
        # After the decode attention kernel the output projection warms L2 with its weight
        # while that latency-bound kernel runs.
        return row_parallel(self.proj, y_BHTd.transpose(1, 2).reshape(B, T, H * hd), self.tp,
                            self.backends.matmul, warm_l2=decode_kernel)
