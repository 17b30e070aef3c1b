"""Per-head q/k RMSNorm (Qwen3) and RoPE in one Triton pass that writes q and k (and, for the
engine's prefill, the keys and values into their KV-cache slot), for inference.

Why: moeflow.model.attention.prepare_qk in plain torch is ~20 kernels over the query tensor
(the norm's fp32 temporaries, then RoPE's slices, cats, negation, two products and a sum),
about 0.3 ms per layer on a 2048-token prefill of the Qwen3-30B-A3B shape, where reading q and k
once and writing them once takes ~15 µs. torch.compile's shape-dynamic twin measured slower than
plain torch at this size (moeflow.ops.backend.FUSE_MAX_ELEMENTS).

One program normalises and rotates a tile of BLOCK_T tokens × a block of heads of q or of k;
q and k tiles are programs of one launch, each tensor with its own heads per program (at most its
head count: k's 4 heads of Qwen3-30B-A3B do not pad a tile of q's 32). The first version ran one
token per program (18,432 programs moving 1 KB each in that prefill): 16.7 µs per layer on the
H200 for 38 MB read and written, about half its copy rate. The tiles are the launcher's arguments
(benchmarks/elementwise_sweep.py sweeps them). The defaults, 2 tokens × 4 heads on one warp,
were the fastest of 60 tiles on the H200 at 2048 and 128 tokens and within 1.2% of it at 8192:
12.5 µs per Qwen3-30B-A3B layer at 2048 tokens against the first version's 16.1 µs, same bits
(benchmarks/results/elementwise_sweep/).

The math is the reference's (moeflow.model.norms.rms_norm then
moeflow.model.rope.apply_rope): the norm in fp32, rounded to the input dtype as the reference
rounds it; then the rotation in fp32 with one rounding at the end, where the reference rounds
each product and the sum in the input dtype (the fused result is the more exact one; in bf16
they differ by about one unit in the last place). The norm's sum of squares runs in one fixed
order (_sum_squares), so every tile gives the same bits. `interleave` (DeepSeek) reads the pairs
(x0, x1), (x2, x3), ... into the two halves as the reference's gather does.

Inputs may be strided views (the heads of the fused qkv projection, transposed to [B, H, T, hd]).
q comes back as a [B, H, T, hd] view of [B, T, H, hd] memory: cuDNN's attention allocates its
output in the layout of q, so the output is then [B, T, H, hd] in memory too and the output
projection's `transpose(1, 2).reshape(B, T, H·hd)` is a view, not the 16 MB strided copy per
layer (20 µs on the H200) it was for a 2048-token Qwen3-30B-A3B prefill with contiguous q.
k comes back contiguous [B, G, T, hd] (the KV cache's layout). Forward only (no autograd).

Given a KVSlotWrite (the engine's prefill into a KV-cache slot, moeflow.infer.slot_cache.
SlotPrefillView), the programs of k's heads also store their output rows into the key cache
rows [slot, g, t] and copy the value rows of the same tokens and heads into the value cache,
with the slot read on the device. This replaces the separate slot-write launch
(moeflow.ops.slot_write_triton: 3.6 µs per layer plus ~1.9 µs of launch gap in the CUDA graph
for a 2048-token Qwen3-30B-A3B prefill on the H200, ~0.27 ms of 30.5 ms over 48 layers): the
keys are written from registers instead of being read back, and one launch less per layer.
That gain is expected, not yet measured.
Legend: B batch, T tokens, H query heads, G kv heads, hd head dim (even), HALF = hd / 2,
N cache slots, M slot length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2

# Tiles of _launch: the fastest in benchmarks/elementwise_sweep.py on the H200 (2026-12-02).
BLOCK_T, BLOCK_H, NUM_WARPS = 2, 4, 1


@triton.jit
def _sum_squares(x, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ x² over the last axis of a tile x [..., BLOCK_D] (BLOCK_D a power of two ≥ 4), as [R]
    (R: the product of the other dims), in one order whatever layout the compiler gives the
    tile: each run of 4 adjacent dims in order, then the run sums pairwise (run i with run
    i + n/2, then again on the n/2 sums...). tl.sum's order follows the layout, which changes
    with the tile and num_warps. This is the order tl.sum took in the one-token kernel this
    replaced, for bf16 heads of 128 on sm_90 with Triton 3.6 (4 dims per thread, then 16 lanes;
    the PTX's multiply-adds match too), so there its outputs are the same bits."""
    RUNS: tl.constexpr = BLOCK_D // 4
    sq = tl.reshape(x * x, [R, RUNS, 2, 2])
    even, odd = tl.split(sq)  # [R, RUNS, 2]: dims 4i, 4i + 2 and 4i + 1, 4i + 3
    d0, d2 = tl.split(even)
    d1, d3 = tl.split(odd)
    s = ((d0 + d1) + d2) + d3
    for i in tl.static_range(1, 16):
        if (RUNS >> i) > 0:
            s = tl.sum(tl.reshape(s, [R, 2, RUNS >> i]), axis=1)
    return tl.reshape(s, [R])


@triton.jit
def rotate_halves(x1, x2, cos1, cos2, sin1, sin2):
    """RoPE of a head's two halves in fp32: (x1·cos1 − x2·sin1, x2·cos2 + x1·sin2), each as an
    explicit fused multiply-add onto the other product, so that every kernel that rotates
    (this one, the decode attention's) gets the same bits whatever the compiler would
    otherwise contract (plain `a * b - c * d` was fused differently in two kernels)."""
    return tl.fma(x1, cos1, -(x2 * sin1)), tl.fma(x2, cos2, x1 * sin2)


@triton.jit
def _heads_tile(src_ptr, s_b, s_h, s_t, dst_ptr, o_b, o_h, o_t, w_ptr, cos_ptr, sin_ptr, c_b,
                c_t, b, t0, T, head0, NH, eps, cache_ptr, cache_h, cache_t,
                HD: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                HAS_ROPE: tl.constexpr, INTERLEAVE: tl.constexpr, TO_CACHE: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens t0 .. t0 + BLOCK_T - 1 of batch row b, heads head0 .. head0 + BLOCK_H - 1: a
    [BLOCK_T, BLOCK_H, BLOCK_D] tile per half of the head dim. TO_CACHE: the output rows are
    also stored at cache_ptr + head · cache_h + token · cache_t (batch of one)."""
    t = t0 + tl.arange(0, BLOCK_T)
    heads = head0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    tmask = t < T
    jmask = j < HALF
    m = (tmask[:, None, None] & (heads < NH)[None, :, None]) & jmask[None, None, :]
    # Source positions of the two halves (the interleaved layout gathers even, then odd dims).
    if INTERLEAVE:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    t64 = t.to(tl.int64)[:, None, None]
    h64 = heads.to(tl.int64)[None, :, None]
    base = src_ptr + b * s_b + t64 * s_t + h64 * s_h
    x1 = tl.load(base + i1[None, None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        R: tl.constexpr = BLOCK_T * BLOCK_H
        ms = (_sum_squares(x1, R, BLOCK_D) + _sum_squares(x2, R, BLOCK_D)) / HD
        r = tl.reshape(1.0 / tl.sqrt(ms + eps), [BLOCK_T, BLOCK_H])[:, :, None]
        w1 = tl.load(w_ptr + i1, mask=jmask, other=0.0).to(tl.float32)[None, None, :]
        w2 = tl.load(w_ptr + i2, mask=jmask, other=0.0).to(tl.float32)[None, None, :]
        # The reference returns the normed heads in the input dtype before rotating them.
        x1 = (x1 * r * w1).to(dst_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * r * w2).to(dst_ptr.dtype.element_ty).to(tl.float32)
    if HAS_ROPE:
        # [BLOCK_T, BLOCK_D] loads broadcast over the heads: loaded as [BLOCK_T, 1, BLOCK_D],
        # they got a layout of their own and (sm_90, Triton 3.6) the heads' tiles were moved
        # through shared memory to it and back.
        cm = tmask[:, None] & jmask[None, :]
        ct = b * c_b + t.to(tl.int64)[:, None] * c_t + j[None, :]
        c = cos_ptr + ct
        s = sin_ptr + ct
        cos1 = tl.load(c, mask=cm, other=0.0).to(tl.float32)[:, None, :]
        cos2 = tl.load(c + HALF, mask=cm, other=0.0).to(tl.float32)[:, None, :]
        sin1 = tl.load(s, mask=cm, other=0.0).to(tl.float32)[:, None, :]
        sin2 = tl.load(s + HALF, mask=cm, other=0.0).to(tl.float32)[:, None, :]
        y1, y2 = rotate_halves(x1, x2, cos1, cos2, sin1, sin2)
    else:
        y1 = x1
        y2 = x2
    y1 = y1.to(dst_ptr.dtype.element_ty)
    y2 = y2.to(dst_ptr.dtype.element_ty)
    out = dst_ptr + b * o_b + t64 * o_t + h64 * o_h
    tl.store(out + j[None, None, :], y1, mask=m)
    tl.store(out + HALF + j[None, None, :], y2, mask=m)
    if TO_CACHE:
        row = cache_ptr + t64 * cache_t + h64 * cache_h
        tl.store(row + j[None, None, :], y1, mask=m)
        tl.store(row + HALF + j[None, None, :], y2, mask=m)


@triton.jit
def _copy_heads_tile(src_ptr, s_h, s_t, dst_ptr, o_h, o_t, t0, T, head0, NH,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """The same tile of another tensor (batch of one), copied unchanged: the values beside the
    keys _heads_tile writes into the cache."""
    t64 = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    heads = head0 + tl.arange(0, BLOCK_H)
    h64 = heads.to(tl.int64)[None, :, None]
    j = tl.arange(0, BLOCK_D)[None, None, :]
    m = ((t64 < T) & (heads < NH)[None, :, None]) & (j < HALF)
    src = src_ptr + t64 * s_t + h64 * s_h
    dst = dst_ptr + t64 * o_t + h64 * o_h
    tl.store(dst + j, tl.load(src + j, mask=m), mask=m)
    tl.store(dst + HALF + j, tl.load(src + HALF + j, mask=m), mask=m)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, q_sb, q_sh, q_st, k_ptr, k_sb, k_sh, k_st, qo_ptr, qo_sb,
                         qo_sh, qo_st, ko_ptr, ko_sb, ko_sh, ko_st, qw_ptr, kw_ptr, cos_ptr,
                         sin_ptr, c_b, c_t, H, G, T, eps, v_ptr, v_sh, v_st, kc_ptr, vc_ptr,
                         slot_ptr, M, HD: tl.constexpr, HALF: tl.constexpr,
                         HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                         INTERLEAVE: tl.constexpr, WRITE_KV: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    t_blocks = tl.cdiv(T, BLOCK_T)
    b = (tl.program_id(0) // t_blocks).to(tl.int64)
    t0 = (tl.program_id(0) % t_blocks) * BLOCK_T
    blk = tl.program_id(1)
    q_blocks = tl.cdiv(H, BLOCK_HQ)
    if blk < q_blocks:
        _heads_tile(q_ptr, q_sb, q_sh, q_st, qo_ptr, qo_sb, qo_sh, qo_st, qw_ptr, cos_ptr,
                    sin_ptr, c_b, c_t, b, t0, T, blk * BLOCK_HQ, H, eps, qo_ptr, 0, 0, HD,
                    HALF, HAS_NORM, HAS_ROPE, INTERLEAVE, False, BLOCK_T, BLOCK_HQ, BLOCK_D)
    else:
        head0 = (blk - q_blocks) * BLOCK_HK
        # WRITE_KV: rows [slot, head, token] of one layer's [N, G, M, hd] caches.
        slot_at = 0
        if WRITE_KV:
            slot_at = tl.load(slot_ptr).to(tl.int64) * G * M * HD
            _copy_heads_tile(v_ptr, v_sh, v_st, vc_ptr + slot_at, M * HD, HD, t0, T, head0, G,
                             HALF, BLOCK_T, BLOCK_HK, BLOCK_D)
        _heads_tile(k_ptr, k_sb, k_sh, k_st, ko_ptr, ko_sb, ko_sh, ko_st, kw_ptr, cos_ptr,
                    sin_ptr, c_b, c_t, b, t0, T, head0, G, eps, kc_ptr + slot_at, M * HD, HD,
                    HD, HALF, HAS_NORM, HAS_ROPE, INTERLEAVE, WRITE_KV, BLOCK_T, BLOCK_HK,
                    BLOCK_D)


@dataclass(frozen=True)
class KVSlotWrite:
    """Where qk_norm_rope_triton also stores a prompt's keys (normed and rotated, as returned)
    and values: rows [slot, :, :T] of one layer's caches, slot = slot_1[0] read on the device
    (one captured prefill graph serves every slot). Built by
    moeflow.infer.slot_cache.SlotPrefillView.kv_slot_write."""

    k_NGMd: torch.Tensor  # one layer's key cache, contiguous
    v_NGMd: torch.Tensor  # its value cache, contiguous, value dim = key dim
    slot_1: torch.Tensor  # integer [1] on the device
    v_BGTd: torch.Tensor  # the prompt's values (B = 1), a view with a contiguous head dim


def qk_norm_rope_triton(q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
                        q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                        eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                        interleave: bool, *, kv_write: KVSlotWrite | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """prepare_qk's contract: norms skipped when the weights are None, RoPE when cos is None;
    cos, sin: [B or 1, T, hd]. `kv_write`: also store k's output and the values there."""
    return _launch(q_BHTd, k_BGTd, q_norm_w, k_norm_w, eps, cos, sin, interleave,
                   kv_write=kv_write)


def _check_kv_write(w: KVSlotWrite, k_BGTd: torch.Tensor) -> None:
    B, G, T, hd = k_BGTd.shape
    caches = (w.k_NGMd, w.v_NGMd)
    if (B != 1 or w.v_BGTd.shape != k_BGTd.shape or w.slot_1.shape != (1,)
            or w.slot_1.is_floating_point()
            or any(c.dim() != 4 or c.shape[1] != G or c.shape[2] < T or c.shape[3] != hd
                   or not c.is_contiguous() for c in caches)
            or any(t.dtype != k_BGTd.dtype for t in (*caches, w.v_BGTd))):
        raise ValueError(f"qk_norm_rope: kv_write needs k and v [1, G, T, hd] "
                         f"({tuple(k_BGTd.shape)}, {tuple(w.v_BGTd.shape)}), contiguous caches "
                         f"[N, G, M >= T, hd] ({tuple(w.k_NGMd.shape)}, {tuple(w.v_NGMd.shape)}) "
                         f"of k's dtype and an integer slot_1 [1] ({tuple(w.slot_1.shape)})")


def _launch(q_BHTd, k_BGTd, q_norm_w, k_norm_w, eps, cos, sin, interleave,
            kv_write: KVSlotWrite | None = None, *, block_t: int = BLOCK_T,
            block_h: int = BLOCK_H, num_warps: int = NUM_WARPS):
    """qk_norm_rope_triton with its tiles as the keyword-only arguments
    (benchmarks/elementwise_sweep.py reads their defaults): `block_t` tokens (at most T rounded
    up to a power of two) and `block_h` heads per program, the heads capped per tensor at its
    head count rounded up to a power of two."""
    B, H, T, hd = q_BHTd.shape
    G = k_BGTd.shape[1]
    if hd % 2 or k_BGTd.shape != (B, G, T, hd):
        raise ValueError(f"qk_norm_rope: q {tuple(q_BHTd.shape)} and k {tuple(k_BGTd.shape)} "
                         f"need one even head dim and the same batch and tokens")
    for name, v in (("block_t", block_t), ("block_h", block_h), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"qk_norm_rope: {name} must be a power of two, got {v}")
    if kv_write is not None:
        _check_kv_write(kv_write, k_BGTd)
    if q_BHTd.stride(-1) != 1:
        q_BHTd = q_BHTd.contiguous()
    if k_BGTd.stride(-1) != 1:
        k_BGTd = k_BGTd.contiguous()
    q_out = torch.empty(B, T, H, hd, dtype=q_BHTd.dtype, device=q_BHTd.device).transpose(1, 2)
    k_out = torch.empty(B, G, T, hd, dtype=k_BGTd.dtype, device=k_BGTd.device)
    has_norm, has_rope = q_norm_w is not None, cos is not None
    c_b = c_t = 0
    if has_rope:
        cos, sin = (c.expand(c.shape[0], T, hd).contiguous() for c in (cos, sin))
        c_b = 0 if cos.shape[0] == 1 else cos.stride(0)
        c_t = cos.stride(1)
    k_cache = v_cache = slot_1 = v_BGTd = k_out  # unread placeholders without kv_write
    if kv_write is not None:
        k_cache, v_cache, slot_1 = kv_write.k_NGMd, kv_write.v_NGMd, kv_write.slot_1
        v_BGTd = kv_write.v_BGTd if kv_write.v_BGTd.stride(-1) == 1 else \
            kv_write.v_BGTd.contiguous()
    block_t = min(block_t, next_power_of_2(T))
    block_hq = min(block_h, next_power_of_2(H))
    block_hk = min(block_h, next_power_of_2(G))
    grid = (B * cdiv(T, block_t), cdiv(H, block_hq) + cdiv(G, block_hk))
    if B * T:
        _qk_norm_rope_kernel[grid](
            q_BHTd, q_BHTd.stride(0), q_BHTd.stride(1), q_BHTd.stride(2),
            k_BGTd, k_BGTd.stride(0), k_BGTd.stride(1), k_BGTd.stride(2),
            q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
            q_norm_w if has_norm else q_out, k_norm_w if has_norm else k_out,
            cos if has_rope else q_out, sin if has_rope else q_out, c_b, c_t, H, G, T,
            float(eps), v_BGTd, v_BGTd.stride(1), v_BGTd.stride(2), k_cache, v_cache, slot_1,
            k_cache.shape[2], HD=hd, HALF=hd // 2, HAS_NORM=has_norm, HAS_ROPE=has_rope,
            INTERLEAVE=interleave, WRITE_KV=kv_write is not None, BLOCK_T=block_t,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            BLOCK_D=max(next_power_of_2(hd // 2), 4), num_warps=num_warps)
    return q_out, k_out
