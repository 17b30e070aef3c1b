"""A prompt's keys and values into one slot of the KV cache on CUDA, in one launch, with the slot
read from a device tensor (so that one captured prefill graph serves every slot).

Why: `index_copy_` of the keys and of the values into the [slot, :, :T] slices of a layer's cache
(strided source, strided destination) took 5.6 µs per tensor per layer in a 2048-token prefill
of the Qwen3-30B-A3B shape on an H200 (2 MB each: 0.4 TB/s; 0.54 of its 37 ms). Here one program
per (block of positions, kv head) copies both tensors' rows.

Where attention runs the q/k norm + RoPE kernel (moeflow.ops.qk_rope_triton, Triton elementwise
backend), that kernel stores the keys and values into the slot itself and this launch is
skipped (moeflow.infer.slot_cache.SlotPrefillView.kv_slot_write). This one remains for the
prefills that do not run it: no per-head q/k norm and no RoPE (learned positions), MLA, the
reference elementwise backend.

Legend: B = 1 sequence, G kv heads, T prompt positions, N slots, M slot length, dk/dv head dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2


@triton.jit
def _slot_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T, G, M,
                       sk_g, sk_t, sv_g, sv_t, DK: tl.constexpr, DV: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    tmask = t < T
    row = (tl.load(slot_ptr).to(tl.int64) * G + g) * M + t  # cache row [slot, g, t]
    dk = tl.arange(0, BLOCK_DK)
    m = tmask[:, None] & (dk < DK)[None, :]
    k = tl.load(k_ptr + g * sk_g + t[:, None].to(tl.int64) * sk_t + dk[None, :], mask=m)
    tl.store(kc_ptr + row[:, None] * DK + dk[None, :], k, mask=m)
    dv = tl.arange(0, BLOCK_DV)
    m = tmask[:, None] & (dv < DV)[None, :]
    v = tl.load(v_ptr + g * sv_g + t[:, None].to(tl.int64) * sv_t + dv[None, :], mask=m)
    tl.store(vc_ptr + row[:, None] * DV + dv[None, :], v, mask=m)


def write_slot_triton(k_NGMd: torch.Tensor, v_NGMd: torch.Tensor, slot_1: torch.Tensor,
                      k_BGTd: torch.Tensor, v_BGTd: torch.Tensor) -> None:
    """k_NGMd[slot, :, :T] = k_BGTd[0] and the same for v, slot = slot_1[0] (read on the device).
    The caches are one layer's (contiguous); the prompt tensors may be strided views with
    contiguous head dims."""
    T, G = k_BGTd.shape[2], k_BGTd.shape[1]
    if T == 0:
        return
    k_BGTd, v_BGTd = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_BGTd, v_BGTd))
    DK, DV = k_BGTd.shape[-1], v_BGTd.shape[-1]
    block_t = 32
    _slot_write_kernel[(cdiv(T, block_t), G)](
        k_BGTd, v_BGTd, k_NGMd, v_NGMd, slot_1, T, G, k_NGMd.shape[2],
        k_BGTd.stride(1), k_BGTd.stride(2), v_BGTd.stride(1), v_BGTd.stride(2), DK=DK, DV=DV,
        BLOCK_T=block_t, BLOCK_DK=next_power_of_2(DK),
        BLOCK_DV=next_power_of_2(DV), num_warps=4)
