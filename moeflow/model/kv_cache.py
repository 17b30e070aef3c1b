"""A static key/value cache for incremental decoding of one batch, and the cache protocol.

The model talks to any cache through three methods (the serving engine's per-slot cache in
`moeflow.infer.kv_cache` implements the same ones):

  positions(num_new, device) -> int64 [B or 1, num_new]: the position of every new token (RoPE,
      learned position embeddings);
  attend(layer, q_BHTd, k_BGTd, v_BGTd) -> y_BHTd: store the new keys/values of `layer` and let
      each new query attend causally to its own sequence's keys;
  advance(num_new): called once after the forward pass.

`KVCache` holds one preallocated buffer per layer, [B, G, max_len, d]; all sequences in the batch
share one length, so it suits equal-length prompts (`generate`).
"""

from __future__ import annotations

import torch

from moeflow.model.attention import sdpa


def kv_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """Per layer (kv heads, key dim, value dim) of what attention caches."""
    return [block.attn.kv_shape() for block in model.blocks]


class KVCache:
    def __init__(self, shapes: list[tuple[int, int, int]], batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.k = [torch.zeros(batch, g, max_len, dk, dtype=dtype, device=device)
                  for g, dk, _ in shapes]
        self.v = [torch.zeros(batch, g, max_len, dv, dtype=dtype, device=device)
                  for g, _, dv in shapes]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        p = next(model.parameters())
        return cls(kv_shapes(model), batch, max_len or model.config.max_seq_len,
                   dtype=dtype or p.dtype, device=p.device)

    def positions(self, num_new: int, device: torch.device | str) -> torch.Tensor:
        if self.length + num_new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + num_new} tokens > max_len "
                             f"{self.max_len}")
        return torch.arange(self.length, self.length + num_new, device=device)[None]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, G, T, d] at [length, length+T); return all keys/values so far."""
        end = self.length + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k_new
        self.v[layer][:, :, self.length:end] = v_new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
               v_BGTd: torch.Tensor) -> torch.Tensor:
        T, offset = q_BHTd.shape[2], self.length
        k_BGSd, v_BGSd = self.update(layer, k_BGTd, v_BGTd)
        if offset == 0:
            return sdpa(q_BHTd, k_BGSd, v_BGSd, causal=T > 1)
        mask = None
        if T > 1:  # a chunk after cached tokens: query i sees keys <= offset + i
            q_pos = torch.arange(offset, offset + T, device=q_BHTd.device)
            mask = torch.arange(k_BGSd.shape[2], device=q_BHTd.device)[None, :] <= q_pos[:, None]
        return sdpa(q_BHTd, k_BGSd, v_BGSd, mask=mask)

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def reset(self) -> None:
        self.length = 0
