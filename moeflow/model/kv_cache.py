"""A static key/value cache for incremental decoding.

One preallocated buffer per layer, [B, H_kv, max_len, head_dim]. All sequences in the batch share
one length: the model writes the new keys/values of every layer at positions
[length, length + T) and then calls `advance(T)`. The inference engine's paged cache implements
the same two methods.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                   dtype=dtype or p.dtype, device=p.device)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, H_kv, T, hd] at [length, length+T); return all keys/values so far."""
        end = self.length + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k_new
        self.v[layer][:, :, self.length:end] = v_new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0
