"""Per-head q/k RMSNorm (Qwen3) and RoPE in one Triton pass that writes q and k, for inference.

Why: moeflow.model.attention.prepare_qk in plain torch is ~20 kernels over the query tensor
(the norm's fp32 temporaries, then RoPE's slices, cats, negation, two products and a sum),
about 0.3 ms per layer on a 2048-token prefill of the Qwen3-30B-A3B shape, where reading q and k
once and writing them once takes ~15 µs. torch.compile's shape-dynamic twin measured slower than
plain torch at this size (moeflow.ops.backend.FUSE_MAX_ELEMENTS).

One program normalises and rotates a block of heads of one token; q and k heads are programs of
the same launch. The math is the reference's (moeflow.model.norms.rms_norm then
moeflow.model.rope.apply_rope): the norm in fp32, rounded to the input dtype as the reference
rounds it; then the rotation in fp32 with one rounding at the end, where the reference rounds
each product and the sum in the input dtype (the fused result is the more exact one; in bf16
they differ by about one unit in the last place). `interleave` (DeepSeek) reads the pairs
(x0, x1), (x2, x3), ... into the two halves as the reference's gather does.

Inputs may be strided views (the heads of the fused qkv projection, transposed to [B, H, T, hd]).
q comes back as a [B, H, T, hd] view of [B, T, H, hd] memory: cuDNN's attention allocates its
output in the layout of q, so the output is then [B, T, H, hd] in memory too and the output
projection's `transpose(1, 2).reshape(B, T, H·hd)` is a view, not the 16 MB strided copy per
layer (20 µs on the H200) it was for a 2048-token Qwen3-30B-A3B prefill with contiguous q.
k comes back contiguous [B, G, T, hd] (the KV cache's layout). Forward only (no autograd).
Legend: B batch, T tokens, H query heads, G kv heads, hd head dim (even), HALF = hd / 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _heads_tile(src_ptr, s_b, s_h, s_t, dst_ptr, o_b, o_h, o_t, w_ptr, cos_ptr, sin_ptr, c_b,
                c_t, b, t, head0, NH, eps, HD: tl.constexpr, HALF: tl.constexpr,
                HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = head0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    hmask = heads < NH
    jmask = j < HALF
    m = hmask[:, None] & jmask[None, :]
    # Source positions of the two halves (the interleaved layout gathers even, then odd dims).
    if INTERLEAVE:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    base = src_ptr + b * s_b + t * s_t + heads[:, None].to(tl.int64) * s_h
    x1 = tl.load(base + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        ms = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HD
        r = (1.0 / tl.sqrt(ms + eps))[:, None]
        w1 = tl.load(w_ptr + i1, mask=jmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + i2, mask=jmask, other=0.0).to(tl.float32)[None, :]
        # The reference returns the normed heads in the input dtype before rotating them.
        x1 = (x1 * r * w1).to(dst_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * r * w2).to(dst_ptr.dtype.element_ty).to(tl.float32)
    if HAS_ROPE:
        c = cos_ptr + b * c_b + t * c_t
        s = sin_ptr + b * c_b + t * c_t
        cos1 = tl.load(c + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(c + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(s + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(s + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    else:
        y1 = x1
        y2 = x2
    out = dst_ptr + b * o_b + t * o_t + heads[:, None].to(tl.int64) * o_h
    tl.store(out + j[None, :], y1.to(dst_ptr.dtype.element_ty), mask=m)
    tl.store(out + HALF + j[None, :], y2.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, q_sb, q_sh, q_st, k_ptr, k_sb, k_sh, k_st, qo_ptr, qo_sb,
                         qo_sh, qo_st, ko_ptr, ko_sb, ko_sh, ko_st, qw_ptr, kw_ptr, cos_ptr,
                         sin_ptr, c_b, c_t, H, G, T, eps,
                         HD: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                         HAS_ROPE: tl.constexpr, INTERLEAVE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    blk = tl.program_id(1)
    q_blocks = tl.cdiv(H, BLOCK_H)
    if blk < q_blocks:
        _heads_tile(q_ptr, q_sb, q_sh, q_st, qo_ptr, qo_sb, qo_sh, qo_st, qw_ptr, cos_ptr,
                    sin_ptr, c_b, c_t, b, t, blk * BLOCK_H, H, eps, HD, HALF, HAS_NORM,
                    HAS_ROPE, INTERLEAVE, BLOCK_H, BLOCK_D)
    else:
        _heads_tile(k_ptr, k_sb, k_sh, k_st, ko_ptr, ko_sb, ko_sh, ko_st, kw_ptr, cos_ptr,
                    sin_ptr, c_b, c_t, b, t, (blk - q_blocks) * BLOCK_H, G, eps, HD, HALF,
                    HAS_NORM, HAS_ROPE, INTERLEAVE, BLOCK_H, BLOCK_D)


def qk_norm_rope_triton(q_BHTd: torch.Tensor, k_BGTd: torch.Tensor,
                        q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                        eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                        interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """prepare_qk's contract: norms skipped when the weights are None, RoPE when cos is None;
    cos, sin: [B or 1, T, hd]."""
    B, H, T, hd = q_BHTd.shape
    G = k_BGTd.shape[1]
    if hd % 2 or k_BGTd.shape != (B, G, T, hd):
        raise ValueError(f"qk_norm_rope: q {tuple(q_BHTd.shape)} and k {tuple(k_BGTd.shape)} "
                         f"need one even head dim and the same batch and tokens")
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
    block_h = min(triton.next_power_of_2(max(H, G)), 4)
    grid = (B * T, triton.cdiv(H, block_h) + triton.cdiv(G, block_h))
    if B * T:
        _qk_norm_rope_kernel[grid](
            q_BHTd, q_BHTd.stride(0), q_BHTd.stride(1), q_BHTd.stride(2),
            k_BGTd, k_BGTd.stride(0), k_BGTd.stride(1), k_BGTd.stride(2),
            q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
            q_norm_w if has_norm else q_out, k_norm_w if has_norm else k_out,
            cos if has_rope else q_out, sin if has_rope else q_out, c_b, c_t, H, G, T,
            float(eps), HD=hd, HALF=hd // 2, HAS_NORM=has_norm, HAS_ROPE=has_rope,
            INTERLEAVE=interleave, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(hd // 2),
            num_warps=2)
    return q_out, k_out
