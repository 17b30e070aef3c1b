"""The serving engine's KV cache: one fixed slot of `max_len` positions per running sequence.

Why slots and not pages: decode reads every cached key of every running sequence once per layer
per step, so the keys must be readable in place. A slot keeps a sequence's keys contiguous, so
decode attention is one batched matmul over `k[:B, :, :S]` with no gather (a paged cache without
a paged-attention kernel would copy every sequence's keys each step), and the shapes depend only
on (batch, key length), which is what CUDA-graph capture needs. The price is memory reserved for
`max_len` tokens per slot; the engine sizes the slot count from its token budget.

Running sequences always occupy slots 0..B-1 (`move` compacts the cache when one leaves), so the
decode batch is a prefix of the slot axis and padding a batch up to a captured bucket only
touches free slots.

The model talks to a cache through these methods (moeflow.model.attention hands "store the new
keys/values and attend over everything cached" to it, because only the cache knows where each
sequence's earlier keys live):

  positions(num_new, device) -> int64 [B or 1, num_new]: the position of every new token (RoPE,
      learned position embeddings);
  kv_slot_write(layer, q_BHTd, v_BGTd) -> KVSlotWrite or None: where the q/k norm + RoPE kernel
      (moeflow.ops.qk_rope_triton) may store the new keys/values of `layer` itself, saving the
      cache its own write; only SlotPrefillView with the Triton attention backend says where;
  prepares_qk(q_BHTd) -> bool: whether attend takes raw queries and keys with a QKPrep and
      applies their norm and RoPE itself (only DecodeView with the Triton attention backend:
      the decode kernel does it as it loads them, saving the q/k kernel's launch);
  attend(layer, q_BHTd, k_BGTd, v_BGTd) -> y_BHTd: store the new keys/values of `layer` and let
      each new query attend causally to its own sequence's keys (SlotPrefillView takes
      kv_written=True when the kernel stored them as kv_slot_write asked; DecodeView takes
      qk=QKPrep where prepares_qk said so);
  advance(num_new): called once after the forward pass.

Three views implement it for one forward pass: `PrefillView` (one sequence, a chunk of new tokens
from `start`), `SlotPrefillView` (a whole prompt, padded, into a slot named by a device tensor:
the engine's captured prefill, moeflow.infer.prefill_graphs) and `DecodeView` (one new token for
each of slots 0..B-1 at its own position, keys read up to a static length S; on CUDA one Triton
pass that also stores the new keys/values and reads each sequence's keys only up to its own
length, moeflow.ops.decode_attention_triton, as the model's Backends.attention decides). This is
moeflow's only KV cache: `moeflow generate`, the demo and the server all decode through the
engine that owns it.

Legend: L layers, N slots, G kv heads, M max_len, S keys read, B batch, H query heads, T new
tokens, dk/dv key/value dims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeflow.model.attention import sdpa
from moeflow.ops.backend import Backends, resolve_attention_backend
from moeflow.ops.fused import fused

if TYPE_CHECKING:  # the kernels' modules import Triton, which the CPU-only install may lack
    from moeflow.ops.decode_attention_triton import QKPrep
    from moeflow.ops.qk_rope_triton import KVSlotWrite


def kv_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """Per layer (kv heads, key dim, value dim) of what attention caches."""
    return [block.attn.kv_shape() for block in model.blocks]


class SlotKVCache:
    def __init__(self, shapes: list[tuple[int, int, int]], num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str,
                 backends: Backends = Backends()) -> None:
        if len(set(shapes)) != 1:
            raise ValueError(f"SlotKVCache needs one kv shape for every layer, "
                             f"got {sorted(set(shapes))}")
        G, dk, dv = shapes[0]
        L = len(shapes)
        # One tensor for all layers, so moving a sequence between slots is one copy per K and V.
        self.k_LNGMd = torch.zeros(L, num_slots, G, max_len, dk, dtype=dtype, device=device)
        self.v_LNGMd = torch.zeros(L, num_slots, G, max_len, dv, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        # The model's choice (fuse, attention) for decode attention, taken when the cache is built.
        self.backends = backends
        # The Triton decode attention's merge tickets (one counter per slot and kv head), zero
        # between launches; the layers take turns with them.
        self.merge_tickets = torch.zeros(num_slots * G, dtype=torch.int32, device=device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_slots: int, max_len: int) -> "SlotKVCache":
        p = next(model.parameters())
        return cls(kv_shapes(model), num_slots, max_len, p.dtype, p.device, model.backends)

    @staticmethod
    def bytes_per_token(model: torch.nn.Module) -> int:
        p = next(model.parameters())
        return sum(g * (dk + dv) for g, dk, dv in kv_shapes(model)) * p.element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        self.k_LNGMd[:, dst, :, :length] = self.k_LNGMd[:, src, :, :length]
        self.v_LNGMd[:, dst, :, :length] = self.v_LNGMd[:, src, :, :length]


class PrefillView:
    """Tokens [start, start+T) of the sequence in `slot` (batch of one)."""

    def __init__(self, cache: SlotKVCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def positions(self, num_new: int, device: torch.device | str) -> torch.Tensor:
        if self.start + num_new > self.cache.max_len:
            raise ValueError(f"KV slot overflow: {self.start + num_new} tokens > max_len "
                             f"{self.cache.max_len}")
        return torch.arange(self.start, self.start + num_new, device=device)[None]

    def kv_slot_write(self, layer: int, q_BHTd: torch.Tensor, v_BGTd: torch.Tensor) -> None:
        return None  # attend writes the chunk (not a captured path: no launch to save)

    def prepares_qk(self, q_BHTd: torch.Tensor) -> bool:
        return False

    def attend(self, layer: int, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
               v_BGTd: torch.Tensor) -> torch.Tensor:
        T, end = q_BHTd.shape[2], self.start + q_BHTd.shape[2]
        k_GMd, v_GMd = self.cache.k_LNGMd[layer, self.slot], self.cache.v_LNGMd[layer, self.slot]
        k_GMd[:, self.start:end] = k_BGTd[0]
        v_GMd[:, self.start:end] = v_BGTd[0]
        if self.start == 0:
            return sdpa(q_BHTd, k_BGTd, v_BGTd, causal=T > 1)
        q_pos = torch.arange(self.start, end, device=q_BHTd.device)
        mask_TS = torch.arange(end, device=q_BHTd.device)[None, :] <= q_pos[:, None]
        return sdpa(q_BHTd, k_GMd[None, :, :end], v_GMd[None, :, :end], mask=mask_TS)

    def advance(self, num_new: int) -> None:
        pass


class SlotPrefillView:
    """A prompt from position 0 into the slot held by the device tensor `slot_1` (shape [1]), so
    that one captured CUDA graph serves every slot. The prompt may be padded at its end (the
    captured bucket): padding rows come after every real token, so causal attention keeps them
    out of the real rows; their keys land in the slot past the prompt, where decode masks them
    until it overwrites them position by position."""

    def __init__(self, cache: SlotKVCache, slot_1: torch.Tensor) -> None:
        self.cache, self.slot_1 = cache, slot_1

    def positions(self, num_new: int, device: torch.device | str) -> torch.Tensor:
        if num_new > self.cache.max_len:
            raise ValueError(f"KV slot overflow: {num_new} tokens > max_len "
                             f"{self.cache.max_len}")
        return torch.arange(num_new, device=device)[None]

    def kv_slot_write(self, layer: int, q_BHTd: torch.Tensor, v_BGTd: torch.Tensor
                      ) -> KVSlotWrite | None:
        """With the Triton attention backend (the one that writes the slot in a kernel), the
        q/k kernel stores the keys and values into the slot: one launch per layer less."""
        if resolve_attention_backend(self.cache.backends.attention, q_BHTd) != "triton":
            return None
        from moeflow.ops.qk_rope_triton import KVSlotWrite
        return KVSlotWrite(self.cache.k_LNGMd[layer], self.cache.v_LNGMd[layer], self.slot_1,
                           v_BGTd)

    def prepares_qk(self, q_BHTd: torch.Tensor) -> bool:
        return False

    def attend(self, layer: int, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
               v_BGTd: torch.Tensor, kv_written: bool = False) -> torch.Tensor:
        """kv_written: the q/k kernel already stored k and v (kv_slot_write)."""
        T = q_BHTd.shape[2]
        if not kv_written:
            if resolve_attention_backend(self.cache.backends.attention, q_BHTd) == "triton":
                from moeflow.ops.slot_write_triton import write_slot_triton
                write_slot_triton(self.cache.k_LNGMd[layer], self.cache.v_LNGMd[layer],
                                  self.slot_1, k_BGTd, v_BGTd)
            else:
                self.cache.k_LNGMd[layer, :, :, :T].index_copy_(0, self.slot_1, k_BGTd)
                self.cache.v_LNGMd[layer, :, :, :T].index_copy_(0, self.slot_1, v_BGTd)
        return sdpa(q_BHTd, k_BGTd, v_BGTd, causal=T > 1)

    def advance(self, num_new: int) -> None:
        pass


@fused
def decode_attention(q_BHd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                     visible_BS: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cached keys; grouped heads share their kv head without
    copying it (queries are viewed as [B, G, H/G, d]). Softmax in fp32. Returns [B, H, dv]."""
    B, H, dk = q_BHd.shape
    G = k_BGSd.shape[1]
    q_BGQd = q_BHd.view(B, G, H // G, dk)
    scores_BGQS = torch.matmul(q_BGQd, k_BGSd.transpose(-1, -2)).float() * dk ** -0.5
    scores_BGQS = scores_BGQS.masked_fill(~visible_BS[:, None, None, :], float("-inf"))
    probs_BGQS = scores_BGQS.softmax(dim=-1).to(v_BGSd.dtype)
    return torch.matmul(probs_BGQS, v_BGSd).view(B, H, -1)


class DecodeView:
    """One new token for each of slots 0..B-1; `lengths_B` (a device tensor) holds each
    sequence's cached length, which is the new token's position. Keys are read up to `kv_len`
    (a static bound >= max length + 1, so the shapes suit graph capture); the engine, not
    `advance`, updates lengths."""

    def __init__(self, cache: SlotKVCache, lengths_B: torch.Tensor, kv_len: int) -> None:
        if kv_len > cache.max_len:
            raise ValueError(f"kv_len {kv_len} > slot max_len {cache.max_len}")
        self.cache, self.lengths_B, self.kv_len = cache, lengths_B, kv_len
        self._visible_BS: torch.Tensor | None = None  # the reference path's mask, made once

    def visible_BS(self) -> torch.Tensor:
        """Which of the S keys each sequence sees, for the reference path only (the Triton
        kernel reads the lengths itself, so a step that runs it builds no mask)."""
        if self._visible_BS is None:
            pos_S = torch.arange(self.kv_len, device=self.lengths_B.device)
            self._visible_BS = pos_S[None, :] <= self.lengths_B[:, None]
        return self._visible_BS

    def positions(self, num_new: int, device: torch.device | str) -> torch.Tensor:
        if num_new != 1:
            raise ValueError(f"DecodeView takes one token per sequence, got {num_new}")
        return self.lengths_B[:, None]

    def kv_slot_write(self, layer: int, q_BHTd: torch.Tensor, v_BGTd: torch.Tensor) -> None:
        return None  # attend stores the new keys (the Triton decode attention in its own pass)

    def prepares_qk(self, q_BHTd: torch.Tensor) -> bool:
        """With the Triton attention backend: the kernel norms and rotates raw q and k."""
        return resolve_attention_backend(self.cache.backends.attention, q_BHTd) == "triton"

    def attend(self, layer: int, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
               v_BGTd: torch.Tensor, qk: QKPrep | None = None) -> torch.Tensor:
        """qk: q and k are raw, prepared by the kernel (where prepares_qk says so)."""
        backends = self.cache.backends
        if resolve_attention_backend(backends.attention, q_BHTd) == "triton":
            from moeflow.ops.decode_attention_triton import decode_attention_triton
            y_BHd = decode_attention_triton(q_BHTd[:, :, 0], k_BGTd[:, :, 0], v_BGTd[:, :, 0],
                                            self.cache.k_LNGMd[layer], self.cache.v_LNGMd[layer],
                                            self.lengths_B, self.kv_len, qk=qk,
                                            tickets=self.cache.merge_tickets)
            return y_BHd[:, :, None]
        if qk is not None:
            raise ValueError("DecodeView.attend: raw q/k (qk) need the Triton attention backend")
        B, G = k_BGTd.shape[:2]
        k_BGMd = self.cache.k_LNGMd[layer, :B]
        v_BGMd = self.cache.v_LNGMd[layer, :B]
        at_B = self.lengths_B.view(B, 1, 1, 1)
        k_BGMd.scatter_(2, at_B.expand(B, G, 1, k_BGMd.shape[-1]), k_BGTd)
        v_BGMd.scatter_(2, at_B.expand(B, G, 1, v_BGMd.shape[-1]), v_BGTd)
        S = self.kv_len
        y_BHd = decode_attention(q_BHTd[:, :, 0], k_BGMd[:, :, :S], v_BGMd[:, :, :S],
                                 self.visible_BS(), fuse=backends.fuse)
        return y_BHd[:, :, None]

    def advance(self, num_new: int) -> None:
        pass
