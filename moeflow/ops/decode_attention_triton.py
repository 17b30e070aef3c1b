"""Decode attention over the slot KV cache as one split-K Triton pass (flash-decoding) that also
stores the new token's key and value, for inference.

Why: the plain path (moeflow.infer.slot_cache.DecodeView with decode_attention) is two scatters
(the new k and v into the cache), then q·Kᵀ, scale, mask, softmax and P·V, each a kernel even
when compiled, ~6 launches per layer at every decode step; and it reads all S keys of the
static bucket (S >= the longest sequence + 1, a power of two for CUDA-graph capture), so a batch
whose sequences are S/2 long reads twice the keys it needs. Here one launch stores k/v and
computes every split's partial softmax and merges them (the last split of each sequence and kv
head to finish, by an atomic ticket; a second small launch where the partials are too many for
one program, none when one split suffices), and keys past a sequence's own length are never
read.

Work split: one program per (sequence b, kv head g, key split s, value slice). The program
computes all H/G query heads of its kv group against the keys of its split (grouped-query
attention reads each key once for the whole group; the queries are padded to 16 rows, the
smallest tl.dot tile), with an fp32 online softmax in base 2 (scores · dk^-0.5 · log2 e), and
sums its slice of the value dims. Splits are chosen from the launch's B·G and S so that a
batch-1 step still fills the GPU (about two programs per SM): up to SLICED_KEYS keys at small
batches by slicing the values (every slice reads all the split's keys and its share of the
values; no merge), else by splitting the keys; a split that starts past position
lengths_B[b] returns at once, so the cost follows each sequence's real length, not S. Every
split that runs has at least one visible key, so no partial is all -inf.

The new token's key is visible to its own query without a read-after-write through memory: each
program reads only cached positions < lengths_B[b]; the one program whose split holds position
lengths_B[b] stores the incoming k/v rows there and folds that key into its softmax from the
registers it loaded them into. No other program reads that position, so there is no race.

The latency of a batch-1 step's attention is its chain of dependent trips to memory, so the
kernel keeps that chain short. Every load a split makes whose address does not depend on the
sequence's length is issued in one round with the length's own load, right after the PDL wait:
the raw queries and the new key and value with their norm weights and rotary rows, and the
split's first block of cached keys and values (masked past kv_len; positions past the length are
taken out of the scores and zeroed in V afterwards, so a split that turns out to be idle has read
a few KB for nothing). Before, the length, the queries, the cached block and the new key came one
after another. Where the last split merges (tickets) and a sequence is shorter than one split
(L < CHUNK: split 0 is the only one that runs), that split writes the output itself, the bits of
a one-split merge (weight exp2(0) = 1), with no partials and no ticket. With PDL the split's first
block of cached rows and the q/k norm weights, which the qkv projection ahead does not write, are
prefetched to L2 before the wait (moeflow.ops.pdl.prefetch_l2). Measured in the batch-1 decode
graph of Qwen3-30B-A3B (H200, session 32, benchmarks/results/decode_timeline, a 36-token
context): the attention's end step 6.30-6.40 -> 4.72-4.86 µs.

CUDA-graph capturable: no host syncs, grid and shapes depend only on (B, G, S); lengths are read
on the device. Numerics: fp32 scores and softmax, probabilities rounded to V's dtype before P·V
(as the reference does), fp32 accumulation, output rounded once to q's dtype. The reference
rounds q·Kᵀ to the input dtype before scaling; this one does not (it is the more exact one).
fp32 inputs use exact fp32 dot products (not TF32), so the fp32 parity tests can be tight.

Forward only (no autograd). Legend: B batch (slots 0..B-1), H query heads, G kv heads,
Q = H/G queries per kv head, N cache slots, M slot length, S keys read (the static bound),
P key splits, dk/dv key/value dims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.pdl import (launch_next, pdl_launch, prefetch_l2, prefetchable,
                             wait_for_previous)
from moeflow.ops.qk_rope_triton import _sum_squares, rotate_halves
from moeflow.ops.tickets import last_to_arrive

# Programs per SM to aim for when splitting keys: enough to hide one program's load latency
# behind another's without making the merge (P partials per head) the larger cost.
PROGRAMS_PER_SM = 2
# Without a GPU (the interpreter runs programs one after another) a few splits, so that tests
# still exercise the merge.
CPU_PROGRAMS = 8
# The split kernel's loop loads through shared memory in this many stages (Triton's default).
LOAD_STAGES = 3
LOG2E = 1.4426950408889634
# Up to this many keys (the bucket, kv_len) one program reads all of a (sequence, kv head)'s
# keys, and the value dims are sliced among up to VALUE_SLICES programs (each at least
# MIN_VALUE_SLICE dims) instead of the keys split among programs and merged: a slice reads every
# key but only its share of the values, with no partials, ticket or merge. Sliced, the launch
# keeps to half the SMs (the output projection, launched early, takes the others), and a 16-bit
# cache reads all the keys as one block (prefetched to L2 before the PDL wait, loaded in one
# round after it). Measured in the served Qwen3-30B-A3B step: on an H100 (session 40) slices of
# two 64-key blocks at a 128-key bucket lost to two key splits (attention 6.04 -> 7.7 µs: the
# second block read after the wait from HBM), and at batch 16 256 sliced programs cost the
# output projection 8 µs; on an H200 (session 41, benchmarks/results/decode_attention) one
# 128-key block in four slices won at 76 tokens, served 2.548-2.574 -> 2.504-2.525 ms, and lost
# at 36 (2.478-2.486 -> 2.494-2.503: the block's 128 keys are loaded whatever the length), which
# the engine's 64-key bucket below 64 tokens (moeflow.infer.decode_graphs.MIN_KV_LEN) avoids.
# Both, on an H100 against two key splits (session 41): batch 1 at 76 tokens 3.013-3.036 ->
# 2.951-2.968 ms, at 36 2.928-2.943 -> 2.922-2.931.
SLICED_KEYS = 128
VALUE_SLICES = 4
MIN_VALUE_SLICE = 32
# The most fp32 partials (query heads per kv head × splits × value dims, each a power of two)
# the last split merges itself: 64 per thread of a 4-warp program. Qwen3-30B-A3B (8 × P × 128)
# merges in the split kernel up to P = 16; more splits (long contexts) launch the merge kernel.
MERGE_TILE = 16384


@triton.jit
def _load_heads(row_ptrs, rmask, w_ptr, cos_ptr, sin_ptr, HD: tl.constexpr, NORM: tl.constexpr,
                ROPE: tl.constexpr):
    """The loads of _prepare_heads, issued together: [BLOCK_R, HD] rows (heads) starting at
    `row_ptrs` as two halves, the norm's weight halves (NORM) and one position's cos/sin halves
    (ROPE; zeros where unused)."""
    HALF: tl.constexpr = HD // 2
    j = tl.arange(0, HALF)
    m = rmask[:, None] & (j < HALF)[None, :]
    x1 = tl.load(row_ptrs[:, None] + j[None, :], mask=m, other=0.0)
    x2 = tl.load(row_ptrs[:, None] + HALF + j[None, :], mask=m, other=0.0)
    unused = tl.zeros([HALF], tl.float32)  # in place of what the prep does not take
    w1 = unused
    w2 = unused
    cos1 = unused
    cos2 = unused
    sin1 = unused
    sin2 = unused
    if NORM:
        w1 = tl.load(w_ptr + j)
        w2 = tl.load(w_ptr + HALF + j)
    if ROPE:
        cos1 = tl.load(cos_ptr + j)
        cos2 = tl.load(cos_ptr + HALF + j)
        sin1 = tl.load(sin_ptr + j)
        sin2 = tl.load(sin_ptr + HALF + j)
    return x1, x2, w1, w2, cos1, cos2, sin1, sin2


@triton.jit
def _prepare_heads(x1, x2, w1, w2, cos1, cos2, sin1, sin2, eps, HD: tl.constexpr,
                   NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                   dtype: tl.constexpr):
    """_load_heads' rows, each RMS-normalised with weight w (NORM) and then rotated by one
    position's cos/sin (ROPE), with the roundings and the sum-of-squares order of
    moeflow.ops.qk_rope_triton's kernel (the same bits as its output): the normed row rounded
    to `dtype`, the rotation in fp32, one rounding at the end. HD a power of two, halves
    rotated (not interleaved)."""
    HALF: tl.constexpr = HD // 2
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:
        ms = (_sum_squares(x1, BLOCK_R, HALF) + _sum_squares(x2, BLOCK_R, HALF)) / HD
        r = (1.0 / tl.sqrt(ms + eps))[:, None]
        x1 = (x1 * r * w1.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        x2 = (x2 * r * w2.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    if ROPE:
        c1 = cos1.to(tl.float32)[None, :]
        c2 = cos2.to(tl.float32)[None, :]
        s1 = sin1.to(tl.float32)[None, :]
        s2 = sin2.to(tl.float32)[None, :]
        y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2)
    else:
        y1 = x1
        y2 = x2
    # [BLOCK_R, HALF] halves → [BLOCK_R, HD]: the first half, then the second.
    y = tl.permute(tl.join(y1.to(dtype), y2.to(dtype)), (0, 2, 1))
    return tl.reshape(y, [BLOCK_R, HD])


@triton.jit
def _cached_block(kc, vc, pos, valid, skc_m, svc_m, dk, dkmask, dv, dvmask):
    """Keys (transposed, [BLOCK_DK, BLOCK_N]) and values ([BLOCK_N, BLOCK_DV]) of the cached
    positions `pos` of one (sequence, kv head), zero where not `valid`."""
    kT_KN = tl.load(kc + pos[None, :].to(tl.int64) * skc_m + dk[:, None],
                    mask=dkmask[:, None] & valid[None, :], other=0.0)
    v_NV = tl.load(vc + pos[:, None].to(tl.int64) * svc_m + dv[None, :],
                   mask=valid[:, None] & dvmask[None, :], other=0.0)
    return kT_KN, v_NV


@triton.jit
def _attend_block(q_QK, kT_KN, v_NV, pmask, m_Q, l_Q, acc_QV, scale_log2,
                  PRECISION: tl.constexpr):
    """One step of the online softmax over a block of cached keys (pmask: the visible ones;
    v_NV zero past them): the running max, sum and P·V with the block folded in."""
    s_QN = tl.dot(q_QK, kT_KN, input_precision=PRECISION) * scale_log2
    s_QN = tl.where(pmask[None, :], s_QN, float("-inf"))
    m_new = tl.maximum(m_Q, tl.max(s_QN, axis=1))
    alpha = tl.exp2(m_Q - m_new)
    p_QN = tl.exp2(s_QN - m_new[:, None])
    l_Q = l_Q * alpha + tl.sum(p_QN, axis=1)
    acc_QV = acc_QV * alpha[:, None] + tl.dot(p_QN.to(v_NV.dtype), v_NV,
                                              input_precision=PRECISION)
    return m_new, l_Q, acc_QV


@triton.jit
def _split_kernel(q_ptr, sq_b, sq_h, kn_ptr, skn_b, skn_g, vn_ptr, svn_b, svn_g,
                  kc_ptr, skc_n, skc_g, skc_m, vc_ptr, svc_n, svc_g, svc_m, len_ptr,
                  m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h,
                  qw_ptr, kw_ptr, cos_ptr, sin_ptr, c_b, eps, tickets_ptr,
                  G, P, CHUNK, kv_len, scale_log2,
                  Q: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_DV: tl.constexpr, SINGLE: tl.constexpr, PRECISION: tl.constexpr,
                  PREP_NORM: tl.constexpr, PREP_ROPE: tl.constexpr, MERGE: tl.constexpr,
                  BLOCK_QM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DVM: tl.constexpr,
                  PREFETCH: tl.constexpr, PDL: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    vs = tl.program_id(2)  # the slice of the value dims this program sums (BLOCK_DV of them)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    start = s * CHUNK
    if PREFETCH:  # before the wait: see the module docstring
        n = tl.minimum(BLOCK_N, kv_len - start).to(tl.int64)
        prefetch_l2(kc_ptr + b * skc_n + g * skc_g + start * skc_m, n * skc_m)
        prefetch_l2(vc_ptr + b * svc_n + g * svc_g + start * svc_m, n * svc_m)
        if PREP_NORM:
            prefetch_l2(qw_ptr, DK)
            prefetch_l2(kw_ptr, DK)
    wait_for_previous(PDL)
    # The next kernel in now (moeflow.ops.pdl): its programs take idle SMs while this
    # latency-bound one runs, and the output projection warms L2 with its weight meanwhile.
    launch_next(PDL)
    qi = tl.arange(0, BLOCK_Q)
    dk = tl.arange(0, BLOCK_DK)
    dv = vs * BLOCK_DV + tl.arange(0, BLOCK_DV)
    qmask = qi < Q
    dkmask = dk < DK
    dvmask = dv < DV
    heads = g * Q + qi
    kc = kc_ptr + b * skc_n + g * skc_g
    vc = vc_ptr + b * svc_n + g * svc_g
    # One round of loads before anything waits on one (the module docstring).
    L = tl.load(len_ptr + b).to(tl.int32)  # the new token's position
    if PREP_NORM or PREP_ROPE:
        one = tl.arange(0, 1)
        q_raw = _load_heads(q_ptr + b * sq_b + heads * sq_h, qmask, qw_ptr, cos_ptr + b * c_b,
                            sin_ptr + b * c_b, DK, PREP_NORM, PREP_ROPE)
        k_raw = _load_heads(kn_ptr + b * skn_b + g * skn_g + one, one < 1, kw_ptr,
                            cos_ptr + b * c_b, sin_ptr + b * c_b, DK, PREP_NORM, PREP_ROPE)
    else:
        q_QK = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dk[None, :],
                       mask=qmask[:, None] & dkmask[None, :], other=0.0)
        k_K = tl.load(kn_ptr + b * skn_b + g * skn_g + dk, mask=dkmask, other=0.0)
    v_V = tl.load(vn_ptr + b * svn_b + g * svn_g + dv, mask=dvmask, other=0.0)
    pos = start + tl.arange(0, BLOCK_N)
    kT_KN, v_NV = _cached_block(kc, vc, pos, pos < kv_len, skc_m, svc_m, dk, dkmask, dv, dvmask)
    if PREP_NORM or PREP_ROPE:
        q_QK = _prepare_heads(*q_raw, eps, DK, PREP_NORM, PREP_ROPE, BLOCK_Q,
                              q_ptr.dtype.element_ty)
        k_K = tl.reshape(_prepare_heads(*k_raw, eps, DK, PREP_NORM, PREP_ROPE, 1,
                                        kn_ptr.dtype.element_ty), [DK])
    if start <= L:
        m_Q = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_Q = tl.zeros([BLOCK_Q], tl.float32)
        acc_QV = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
        end = tl.minimum(start + CHUNK, L)  # cached keys only; position L is the new one
        if start < end:
            pmask = pos < end
            m_Q, l_Q, acc_QV = _attend_block(q_QK, kT_KN, tl.where(pmask[:, None], v_NV, 0.0),
                                             pmask, m_Q, l_Q, acc_QV, scale_log2, PRECISION)
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pmask = pos < end
            kT_KN, v_NV = _cached_block(kc, vc, pos, pmask, skc_m, svc_m, dk, dkmask, dv, dvmask)
            m_Q, l_Q, acc_QV = _attend_block(q_QK, kT_KN, v_NV, pmask, m_Q, l_Q, acc_QV,
                                             scale_log2, PRECISION)
        if L < start + CHUNK:  # this split holds position L: store the new key and use it
            tl.store(kc + L.to(tl.int64) * skc_m + dk, k_K, mask=dkmask & (vs == 0))
            tl.store(vc + L.to(tl.int64) * svc_m + dv, v_V, mask=dvmask)
            # Scored by the cached keys' tl.dot (the key as 16 equal columns): its order of
            # sums is fixed, where tl.sum's would follow q_QK's layout, and that layout differs
            # when the kernel prepares q (fp32 bits did).
            kT_K16 = tl.broadcast_to(k_K[:, None], [BLOCK_DK, 16])
            s_Q = tl.max(tl.dot(q_QK, kT_K16, input_precision=PRECISION), axis=1) * scale_log2
            m_new = tl.maximum(m_Q, s_Q)
            alpha = tl.exp2(m_Q - m_new)
            p_Q = tl.exp2(s_Q - m_new)
            l_Q = l_Q * alpha + p_Q
            # P is rounded to V's dtype before P·V, as in the loop above.
            p_Q = p_Q.to(v_V.dtype).to(tl.float32)
            acc_QV = acc_QV * alpha[:, None] + p_Q[:, None] * v_V.to(tl.float32)[None, :]
            m_Q = m_new
        # With the merge in this kernel, a sequence shorter than one split (L < CHUNK: split 0
        # is the only one that runs) writes its output here: no partials, no ticket, the bits
        # of the merge of one split (weight exp2(0) = 1).
        if SINGLE or (MERGE and L < CHUNK):
            y_QV = acc_QV / l_Q[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + dv[None, :],
                     y_QV.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dvmask[None, :])
        else:
            row = (b * G * Q + heads) * P + s  # partials laid out [B, H, P]
            tl.store(m_ptr + row, m_Q, mask=qmask & (vs == 0))  # each slice has the same
            tl.store(l_ptr + row, l_Q, mask=qmask & (vs == 0))
            tl.store(acc_ptr + row[:, None] * DV + dv[None, :], acc_QV,
                     mask=qmask[:, None] & dvmask[None, :])
            # The last of the programs that run (splits s = 0 .. L // CHUNK, every value slice)
            # to store its partials, by its (sequence, kv head)'s counter (moeflow.ops.tickets),
            # merges them all, every value dim.
            if MERGE:
                if last_to_arrive(tickets_ptr + bg, (L // CHUNK + 1) * tl.num_programs(2)):
                    _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr + b * so_b + g * Q * so_h,
                                 so_h, b * G * Q + g * Q, L // CHUNK + 1, P, Q, DV, BLOCK_QM,
                                 BLOCK_P, BLOCK_DVM)


@triton.jit
def _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr, so_h, h0, splits, P, Q: tl.constexpr,
                 DV: tl.constexpr, BLOCK_QM: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """The merge kernel's sums for Q heads at once: partials' rows (h0 + i) * P + split of
    [B·H, P], the output of head i at out_ptr + i * so_h."""
    qi = tl.arange(0, BLOCK_QM)
    sp = tl.arange(0, BLOCK_P)
    dv = tl.arange(0, BLOCK_DV)
    row_QP = (h0 + qi[:, None]).to(tl.int64) * P + sp[None, :]
    mask_QP = (qi[:, None] < Q) & (sp[None, :] < splits)
    m_QP = tl.load(m_ptr + row_QP, mask=mask_QP, other=float("-inf"))
    l_QP = tl.load(l_ptr + row_QP, mask=mask_QP, other=0.0)
    acc_QPV = tl.load(acc_ptr + row_QP[:, :, None] * DV + dv[None, None, :],
                      mask=mask_QP[:, :, None] & (dv[None, None, :] < DV), other=0.0)
    w_QP = tl.where(mask_QP, tl.exp2(m_QP - tl.max(m_QP, axis=1)[:, None]), 0.0)
    y_QV = tl.sum(acc_QPV * w_QP[:, :, None], axis=1) / tl.sum(l_QP * w_QP, axis=1)[:, None]
    tl.store(out_ptr + qi[:, None] * so_h + dv[None, :],
             y_QV.to(out_ptr.dtype.element_ty), mask=(qi[:, None] < Q) & (dv[None, :] < DV))


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, so_b, so_h, H, P, CHUNK,
                  DV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DV: tl.constexpr,
                  PDL: tl.constexpr):
    """The splits' merge for partials too many for the last split to hold (MERGE_TILE): one
    program per (sequence, head), the same sums as the split kernel's merge."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    L = tl.load(len_ptr + b).to(tl.int32)
    splits = L // CHUNK + 1  # the splits that ran (they start at or before position L)
    _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr + b * so_b + (bh % H) * so_h, so_h, bh, splits,
                 P, 1, DV, 1, BLOCK_P, BLOCK_DV)


@functools.lru_cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch_heads: int, kv_len: int, block_n: int, device: torch.device) -> int:
    """Key splits per (sequence, kv head): about PROGRAMS_PER_SM programs per SM in all, at
    least one key block per split."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index)
    else:
        target = CPU_PROGRAMS
    return max(1, min(cdiv(target, batch_heads), cdiv(kv_len, block_n)))


def work_split(batch_heads: int, kv_len: int, block_n: int, dv: int,
               device: torch.device) -> tuple[int, int]:
    """(key splits, value slices) per (sequence, kv head): up to SLICED_KEYS keys, one split
    and as many value slices as keep the launch within half the SMs (CPU: CPU_PROGRAMS
    programs); where that is one slice, or beyond SLICED_KEYS, num_splits' key splits."""
    slices = 1
    if kv_len <= SLICED_KEYS:
        target = _sm_count(device.index) // 2 if device.type == "cuda" else CPU_PROGRAMS
        while (slices < VALUE_SLICES and batch_heads * 2 * slices <= target
               and dv % (2 * slices) == 0 and dv // (2 * slices) >= MIN_VALUE_SLICE):
            slices *= 2
    if slices == 1:
        return num_splits(batch_heads, kv_len, block_n, device), 1
    return 1, slices


def one_block(kv_len: int, block_n: int, block_dk: int, slice_dv: int, elem_bytes: int,
              shared_bytes: int) -> int:
    """Keys per block for a sliced split of a 16-bit cache: all kv_len keys in one block where
    its pipeline's tiles (LOAD_STAGES of keys and value slices) fit the device's shared memory
    per program (`shared_bytes`), else `block_n`."""
    wide = max(block_n, next_power_of_2(kv_len))
    fits = LOAD_STAGES * wide * (block_dk + slice_dv) * elem_bytes <= shared_bytes
    return wide if elem_bytes <= 2 and fits else block_n


@functools.lru_cache
def _shared_bytes(index: int | None) -> int:
    """Shared memory one program may use (0 where torch does not say)."""
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0)


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class QKPrep:
    """What the split kernel does to raw queries and keys before attending (the work of
    moeflow.ops.qk_rope_triton, same bits, without its launch): a per-head RMSNorm with
    weights q_weight / k_weight [hd] and eps (None: no norm), then RoPE at each sequence's
    position with cos_Bd / sin_Bd [B, hd] (None: no rotation), halves rotated."""
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    eps: float
    cos_Bd: torch.Tensor | None
    sin_Bd: torch.Tensor | None


def prepares(head_dim: int) -> bool:
    """Whether the split kernel can prepare heads of this size: a power of two of at least 16
    dims, so the prepared tile is the kernel's key-dim tile (BLOCK_DK, at least 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention_triton(q_BHd: torch.Tensor, k_BGd: torch.Tensor, v_BGd: torch.Tensor,
                            k_NGMd: torch.Tensor, v_NGMd: torch.Tensor, lengths_B: torch.Tensor,
                            kv_len: int, splits: int | None = None, block_n: int | None = None,
                            num_warps: int = 4, qk: QKPrep | None = None,
                            tickets: torch.Tensor | None = None,
                            value_splits: int | None = None) -> torch.Tensor:
    """Store k_BGd/v_BGd at position lengths_B[b] of slots b = 0..B-1 of the cache k_NGMd/v_NGMd
    (in place), and return each query's attention over its slot's positions 0..lengths_B[b]
    (< kv_len), [B, H, dv] in q's dtype. `splits`, `block_n`, `value_splits` (the programs
    that share a split's value dims, each summing its slice): override the choice (tests,
    benchmarks; work_split's, or with either split given, num_splits' and one slice). `qk`: q
    and k are raw (before their norm and RoPE), prepared by the kernel as it loads them; the
    key stored is the prepared one. `tickets`: int32 zeros, at least B·G (SlotKVCache keeps
    them), left at 0: the last program of each (sequence, kv head) merges the splits itself
    where its Q·P·dv tile of partials is small enough (MERGE_TILE), with no merge launch; one
    launch at a time may use them."""
    B, H, dk = q_BHd.shape
    G, dv = k_BGd.shape[1], v_BGd.shape[-1]
    if H % G or k_NGMd.shape[1] != G or k_NGMd.shape[-1] != dk or v_NGMd.shape[-1] != dv:
        raise ValueError(f"decode attention: q {tuple(q_BHd.shape)}, k {tuple(k_BGd.shape)}, "
                         f"cache {tuple(k_NGMd.shape)}/{tuple(v_NGMd.shape)} do not fit")
    if kv_len > k_NGMd.shape[2] or B > k_NGMd.shape[0]:
        raise ValueError(f"decode attention: kv_len {kv_len} or batch {B} exceeds the cache "
                         f"{tuple(k_NGMd.shape)}")
    ks, vs = k_NGMd.stride(), v_NGMd.stride()  # read once: each stride() is a host call
    if ks[-1] != 1 or vs[-1] != 1:
        raise ValueError("decode attention: the cache's last dim must be contiguous")
    q_BHd, k_BGd, v_BGd = _last_unit(q_BHd), _last_unit(k_BGd), _last_unit(v_BGd)
    Q = H // G
    block_dk, block_dv = max(16, next_power_of_2(dk)), max(16, next_power_of_2(dv))
    chosen_block = block_n is None
    if chosen_block:
        # Keys per loop step. The loop's loads are pipelined through shared memory (3 stages):
        # at head dim 128 a 64-key step takes 70 KB in bf16 and 140 KB in fp32 (ptxas for sm_90),
        # so fp32 and wider heads take 32 keys to stay within smaller GPUs' shared memory.
        block_n = 64 if q_BHd.element_size() <= 2 and max(block_dk, block_dv) <= 128 else 32
    if splits is None and value_splits is None:
        P, slices = work_split(B * G, kv_len, block_n, dv, q_BHd.device)
    else:
        P = splits or num_splits(B * G, kv_len, block_n, q_BHd.device)
        slices = value_splits or 1
    slice_dv = max(16, next_power_of_2(cdiv(dv, max(slices, 1))))
    if slices < 1 or cdiv(dv, slice_dv) != slices:
        raise ValueError(f"decode attention: {dv} value dims do not make {slices} value "
                         f"slices of at least 16")
    if splits is None and value_splits is None and slices > 1 and chosen_block and q_BHd.is_cuda:
        block_n = one_block(kv_len, block_n, block_dk, slice_dv, q_BHd.element_size(),
                            _shared_bytes(q_BHd.device.index))
    chunk = cdiv(cdiv(kv_len, P), block_n) * block_n
    P = cdiv(kv_len, chunk)
    y_BHd = torch.empty(B, H, dv, dtype=q_BHd.dtype, device=q_BHd.device)
    if B == 0:
        return y_BHd
    single = P == 1
    if single:  # the kernel normalises and writes y itself; no partials
        m_BHP = l_BHP = acc_BHPd = y_BHd
    else:
        m_BHP = torch.empty(B, H, P, dtype=torch.float32, device=q_BHd.device)
        l_BHP = torch.empty_like(m_BHP)
        acc_BHPd = torch.empty(B, H, P, dv, dtype=torch.float32, device=q_BHd.device)
    precision = "ieee" if q_BHd.dtype == torch.float32 else "tf32"
    norm = qk is not None and qk.q_weight is not None
    rope = qk is not None and qk.cos_Bd is not None
    if (norm or rope) and not prepares(dk):
        raise ValueError(f"decode attention: heads of {dk} dims cannot be prepared in the "
                         "kernel (a power of two, at least 16)")
    # Rows may be broadcast (stride 0: one position for every sequence); the dims contiguous.
    cos_Bd = _last_unit(qk.cos_Bd) if rope else q_BHd
    sin_Bd = _last_unit(qk.sin_Bd) if rope else q_BHd
    if rope and (cos_Bd.stride(0) != sin_Bd.stride(0) or cos_Bd.shape != (B, dk)):
        cos_Bd, sin_Bd = cos_Bd.expand(B, dk).contiguous(), sin_Bd.expand(B, dk).contiguous()
    if tickets is not None and (tickets.dtype != torch.int32 or tickets.numel() < B * G
                                or tickets.device != q_BHd.device):
        raise ValueError(f"decode attention: tickets must be int32 zeros, at least B·G = "
                         f"{B * G}, on {q_BHd.device}; got {tickets.dtype} "
                         f"[{tickets.numel()}] on {tickets.device}")
    block_qm, block_p = next_power_of_2(Q), next_power_of_2(P)
    pdl = pdl_launch(q_BHd)
    # The split's first block of cached rows (contiguous rows only) and the q/k norm weights,
    # which the kernel ahead (the qkv projection) does not write, are prefetched to L2 before
    # the PDL wait: the loads after it then find L2 instead of HBM.
    prefetch = all(s[2] == c.shape[-1] and prefetchable(c, *s[:3])
                   for c, s in ((k_NGMd, ks), (v_NGMd, vs))) and (not norm or all(
                       prefetchable(w, dk) for w in (qk.q_weight, qk.k_weight)))
    merge = (not single and tickets is not None
             and block_qm * block_p * block_dv <= MERGE_TILE)
    qs, kbs, vbs, ys = q_BHd.stride(), k_BGd.stride(), v_BGd.stride(), y_BHd.stride()
    _split_kernel[(B * G, P, slices)](
        q_BHd, qs[0], qs[1], k_BGd, kbs[0], kbs[1], v_BGd, vbs[0], vbs[1],
        k_NGMd, ks[0], ks[1], ks[2], v_NGMd, vs[0], vs[1], vs[2], lengths_B,
        m_BHP, l_BHP, acc_BHPd, y_BHd, ys[0], ys[1],
        qk.q_weight if norm else q_BHd, qk.k_weight if norm else q_BHd, cos_Bd, sin_Bd,
        cos_Bd.stride(0) if rope else 0, float(qk.eps) if norm else 0.0,
        tickets if merge else lengths_B, G, P, chunk, kv_len, dk ** -0.5 * LOG2E,
        Q=Q, DK=dk, DV=dv, BLOCK_Q=max(16, next_power_of_2(Q)), BLOCK_N=block_n,
        BLOCK_DK=block_dk, BLOCK_DV=slice_dv, SINGLE=single, PRECISION=precision,
        PREP_NORM=norm, PREP_ROPE=rope, MERGE=merge, BLOCK_QM=block_qm, BLOCK_P=block_p,
        BLOCK_DVM=block_dv, PREFETCH=prefetch, num_warps=num_warps, **pdl)
    if not single and not merge:
        _merge_kernel[(B * H,)](m_BHP, l_BHP, acc_BHPd, lengths_B, y_BHd, ys[0], ys[1], H, P,
                                chunk, DV=dv, BLOCK_P=block_p,
                                BLOCK_DV=block_dv, num_warps=4 if block_dv >= 128 else 1,
                                **pdl)
    return y_BHd

