"""moeflow.ops.fp8_linear.quantize_rows as Triton kernels: one read for the amax, one read and one
write for the e4m3 values, bit for bit the plain-torch result on finite rows.

    q_RC, inverse_R1 = quantize_rows_triton(t_RC)   # t bf16 or fp32, rows or columns contiguous

Why: the plain-torch quantize_rows is several elementwise passes (abs/amax, the multiply, the
cast, the copy that makes a transposed operand contiguous); on the H200 it took 0.38 ms for an
8192x2048 bf16 operand and 0.51 ms for its transpose, more than the FP8 GEMM it feeds (0.23 ms),
and a linear's forward and backward quantizes six operands (moeflow.ops.fp8_linear). Reading 32
MB and writing 16 MB take ~0.015 ms at 3.3 TB/s. Not measured on a GPU yet: the prediction is
~0.02-0.03 ms for that operand in either layout (benchmarks/fp8_gemm_study.py times both,
"quantize_rows_triton x" and "quantize_rows_triton x.t()").

Numerics: the same values computed the same way as the reference.
- amax: the largest |t| of the row, taken on the fp32 bit patterns (sign bit cleared) as
  integers. For non-negative floats the integer order is the numeric order, and a NaN's pattern
  lies above +inf's, so a row with a NaN has a NaN amax, as torch.linalg.vector_norm(inf) gives;
  an integer max has no NaN semantics of its own to differ between the interpreter and the GPU
  (tl.max of floats leaves NaN propagation unspecified). bf16 values are widened by shifting
  their bits (exact, as every bf16 -> fp32 cast).
- scale: pow2_scales's k from the amax's exponent and mantissa fields (amax = 1.M·2^(E-127),
  frexp's (m, e) = (1.M/2, E-126), so k = 135 - E - [M > 0x600000]), clamped to
  MAX_SCALE_EXPONENT, with the cases frexp treats apart as torch.frexp returns them on the CPU
  (zero: exponent 0, so k = 9; subnormal: k clamps to 126; inf: (inf, 0), k = 8; NaN: (nan, 0),
  k = 9); scale and inverse built from the exponent bits as there.
- the product t·2^k in fp32. quantize_rows multiplies in t's dtype; for bf16 the two agree:
  a power of two times a bf16 value is exact in bf16 unless it falls below bf16's normal range
  (2^-126), and anything that small is ±0 in e4m3 either way.
- e4m3: the steps of torch's float -> float8_e4m3fn conversion (c10's
  fp8e4m3fn_from_fp32_value) on integers: below 2^-6 an fp32 add of 2^14 rounds |v| to a
  multiple of 2^-9 (e4m3's subnormal spacing) to nearest even and leaves the code in the low
  bits; above, the exponent is rebiased (127 -> 7) and the mantissa rounded from 23 bits to 3 to
  nearest even, the carry running into the exponent; NaN -> 0x7f with v's sign; |v| >= 480, or
  a rounding onto 0x7f, -> 0x7e (±448, saturated).
Finite rows never reach the last two cases (every |v| <= 448), so they are bit-equal under any
torch. Rows holding inf or NaN get quantize_rows' scale and NaN codes, and saturate as torch's
eager cast does since pytorch#178817 (torch 2.12; the 2.13 here saturates, checked) and as
Hopper's cvt.satfinite does; older torch casts a finite overflow to NaN, so there the two differ
at the values that overflow. A NaN's sign bit follows the multiply's NaN propagation, which
differs between platforms and dtypes in torch too (on the CPU the bf16 multiply returns a
positive NaN, the fp32 one keeps the sign).

Why not Triton's own fp32 -> float8e4nv cast: on sm89+ Triton emits the hardware conversion
(cvt.rn.satfinite.e4m3x2.f32: nearest even, saturating), but its CPU interpreter (how the tests
run without a GPU; Triton 3.6, checked against torch) rounds ties away from zero (1.0625 ->
1.125), truncates in e4m3's subnormal range (3·2^-11 -> 0), loses the mantissa's carry into an
odd exponent (1.9375 -> 1.0) and casts |v| >= 464 to NaN, inf to 256 and NaN to 384. Integer
codes make the interpreter run what the GPU runs, for ~20 integer operations per value, which by
the H200's integer rate (an estimate, unmeasured) costs about as long as the memory traffic:
hence the range above. Should the GPU measurement show them to be the bottleneck, the hardware
cast plus a NaN fix-up is the alternative for the GPU (bit-equal on finite rows), tested there
only.

Layout, and why one kernel source for both. A program owns BLOCK_R rows and one chunk of their
columns and walks it in [BLOCK_R, BLOCK_C] tiles; every offset is row·stride_r +
column·stride_c. Triton specializes an integer argument equal to 1, so the stride that is 1 is a
compile-time constant and its coalescing pass orders each load's threads along that axis: one
source reads a row-contiguous operand and a transposed view (and any other strides, uncoalesced)
and only the tile shape, the wrapper's choice, differs: [2, 1024] along rows, [64, 128] for a
transposed view (128 contiguous bytes of bf16 per underlying row per load). The q tile of a
transposed view is stored row-major, which needs a change of register layout between the load
and the store (Triton inserts it, through shared memory; expected from how Triton lowers such
kernels, not inspected on a GPU). Tile sizes are untuned.
Where an operand has enough row blocks to fill the GPU (TARGET_PROGRAMS), each program takes
whole rows and one launch does both passes, the second read hitting L1/L2. Where it has few — a
transposed operand is the backward's, whose rows are the forward's columns, e.g. x.t() of an
8192x2048 x has 2048 rows of 8192, 32 row blocks of 64 — one program per row block could not
keep the GPU's memory busy, so the columns are split over `splits` programs per row block: a
first launch writes each chunk's amax, the second takes the max of a row's chunks and
quantizes its chunk (the operand is then read twice from memory where it misses L2).
Deterministic either way: a max is the same in any order.

Legend: R rows, C columns of the operand; S column chunks (splits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.fp8_linear import FP8, MAX_SCALE_EXPONENT
from moeflow.ops.grid import cdiv, next_power_of_2

# About eight programs per SM on the H200's 132: below this many row blocks, columns are split.
TARGET_PROGRAMS = 1024
ROW_TILE = (2, 1024, 4)  # (BLOCK_R, BLOCK_C, num_warps): a row-contiguous operand
COLUMN_TILE = (64, 128, 8)  # a transposed view: 64 values of each underlying row per load

_MAX_K = tl.constexpr(MAX_SCALE_EXPONENT)


@triton.jit
def _load_bits(ptrs, mask, IS_BF16: tl.constexpr):
    """fp32 bit patterns (int32) of the values at ptrs (bf16 widened exactly). One return: the
    compiler (not the interpreter) also types a return that follows a constexpr branch's."""
    if IS_BF16:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16
    else:
        bits = tl.load(ptrs, mask=mask, other=0)
    return bits


@triton.jit
def _amax_bits(ptrs, cols, rows_ok, step, IS_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """[BLOCK_R] fp32 bit patterns of max |t| over `cols` columns from the tile `ptrs`, moving
    `step` elements per BLOCK_C columns (NaN above inf, see the module docstring); 0 for the
    rows not rows_ok."""
    dc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for c in range(0, cols, BLOCK_C):
        bits = _load_bits(ptrs, rows_ok & (c + dc < cols)[None, :], IS_BF16)
        acc = tl.maximum(acc, bits & 0x7FFFFFFF)
        ptrs += step
    return tl.max(acc, axis=1)


@triton.jit
def _scale_exponent(amax_bits):
    """pow2_scales's k for amaxes given by their fp32 bit patterns (sign cleared)."""
    exponent = amax_bits >> 23
    mantissa = amax_bits & 0x7FFFFF
    k = 135 - exponent - (mantissa > 0x600000).to(tl.int32)
    k = tl.where(exponent == 0, tl.where(mantissa == 0, 9, _MAX_K), k)  # zero, subnormal
    k = tl.where(exponent == 255, tl.where(mantissa == 0, 8, 9), k)  # inf, NaN
    return tl.minimum(k, _MAX_K)


@triton.jit
def _e4m3_codes(v):
    """torch's float8_e4m3fn bit patterns (int32, 0..255) of fp32 values v."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Below 2^-6: |v| + 2^14 rounds to a multiple of 2^-9; its bits above 2^14's are the code.
    subnormal = (mag.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    # Exponent rebiased by -120, mantissa rounded to 3 bits (ties to even: +1 when bit 20 is set).
    normal = (mag - 0x3C000000 + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    code = tl.where(mag < 0x3C800000, subnormal, tl.minimum(normal, 0x7E))
    code = tl.where(mag >= 0x43F00000, tl.where(mag > 0x7F800000, 0x7F, 0x7E), code)  # 480, NaN
    return code | sign


@triton.jit
def _tile_ptrs(t_ptr, row0, c_lo, stride_r, stride_c, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Pointers to the [BLOCK_R, BLOCK_C] tile at (row0, c_lo): an int64 base, int32 offsets."""
    dr = tl.arange(0, BLOCK_R)
    dc = tl.arange(0, BLOCK_C)
    base = t_ptr + row0.to(tl.int64) * stride_r + c_lo.to(tl.int64) * stride_c
    return base + (dr[:, None] * stride_r + dc[None, :] * stride_c)


@triton.jit
def _chunk_amax_kernel(t_ptr, partial_ptr, R, C, chunk, stride_r, stride_c,
                       IS_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_R
    split = tl.program_id(1)
    c_lo = split * chunk
    r = row0 + tl.arange(0, BLOCK_R)
    t_ptrs = _tile_ptrs(t_ptr, row0, c_lo, stride_r, stride_c, BLOCK_R, BLOCK_C)
    amax = _amax_bits(t_ptrs, tl.minimum(chunk, C - c_lo), (r < R)[:, None], BLOCK_C * stride_c,
                      IS_BF16, BLOCK_R, BLOCK_C)
    tl.store(partial_ptr + split.to(tl.int64) * R + r, amax, mask=r < R)


@triton.jit
def _quantize_kernel(t_ptr, partial_ptr, q_ptr, inverse_ptr, R, C, chunk, splits,
                     stride_r, stride_c, IS_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Quantizes columns [split·chunk, +chunk) of rows row0... BLOCK_S == 1: one split (the
    chunk is the whole row), so this program finds its rows' amax itself; else it takes them
    from the chunk maxima partial_SR of _chunk_amax_kernel."""
    row0 = tl.program_id(0) * BLOCK_R
    split = tl.program_id(1)
    c_lo = split * chunk
    cols = tl.minimum(chunk, C - c_lo)
    r = row0 + tl.arange(0, BLOCK_R)
    dc = tl.arange(0, BLOCK_C)
    rows_ok = (r < R)[:, None]
    t_ptrs = _tile_ptrs(t_ptr, row0, c_lo, stride_r, stride_c, BLOCK_R, BLOCK_C)
    step = BLOCK_C * stride_c
    if BLOCK_S == 1:
        amax = _amax_bits(t_ptrs, cols, rows_ok, step, IS_BF16, BLOCK_R, BLOCK_C)
    else:
        s = tl.arange(0, BLOCK_S)
        partial = tl.load(partial_ptr + s[:, None] * R + r[None, :],
                          mask=(s[:, None] < splits) & (r < R)[None, :], other=0)
        amax = tl.max(partial, axis=0)
    k = _scale_exponent(amax)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    tl.store(inverse_ptr + r, ((127 - k) << 23).to(tl.float32, bitcast=True),
             mask=(r < R) & (split == 0))
    q_ptrs = _tile_ptrs(q_ptr, row0, c_lo, C, 1, BLOCK_R, BLOCK_C)
    for c in range(0, cols, BLOCK_C):
        mask = rows_ok & (c + dc < cols)[None, :]
        v = _load_bits(t_ptrs, mask, IS_BF16).to(tl.float32, bitcast=True) * scale[:, None]
        tl.store(q_ptrs, _e4m3_codes(v).to(tl.uint8), mask=mask)
        t_ptrs += step
        q_ptrs += BLOCK_C


def plan_splits(rows: int, cols: int, block_r: int, block_c: int, splits: int | None = None
                ) -> tuple[int, int]:
    """(splits, chunk): how many programs share each row block's columns, and the columns each
    takes (a multiple of block_c). `splits` None: enough for TARGET_PROGRAMS programs."""
    row_blocks, col_blocks = cdiv(rows, block_r), cdiv(cols, block_c)
    if splits is None:
        splits = cdiv(TARGET_PROGRAMS, row_blocks)
    splits = max(1, min(splits, col_blocks))
    chunk = cdiv(col_blocks, splits) * block_c
    return cdiv(cols, chunk), chunk


def quantize_rows_triton(t_RC: torch.Tensor, splits: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(t_RC), bit for bit (see the module docstring for rows holding inf or NaN):
    (q_RC contiguous float8_e4m3fn, inverse_R1 float32). t_RC bf16 or fp32, 2-D, any strides
    (coalesced where its rows or its columns are contiguous). `splits` forces the number of
    column chunks per row block (tests); None chooses (plan_splits)."""
    if t_RC.dim() != 2:
        raise ValueError(f"quantize_rows_triton: expected a 2-D operand, got shape "
                         f"{tuple(t_RC.shape)}")
    if t_RC.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_rows_triton: expected bf16 or fp32, got {t_RC.dtype}")
    R, C = t_RC.shape
    q_RC = torch.empty((R, C), dtype=FP8, device=t_RC.device)
    inverse_R1 = torch.empty((R, 1), dtype=torch.float32, device=t_RC.device)
    if R == 0:
        return q_RC, inverse_R1
    if C == 0:
        raise ValueError("quantize_rows_triton: rows of no columns have no amax")
    columns = t_RC.stride(0) == 1 and t_RC.stride(1) != 1
    block_r, block_c, num_warps = COLUMN_TILE if columns else ROW_TILE
    splits, chunk = plan_splits(R, C, block_r, block_c, splits)
    is_bf16 = t_RC.dtype == torch.bfloat16
    bits_RC = t_RC.view(torch.int16 if is_bf16 else torch.int32)
    grid = (cdiv(R, block_r), splits)
    partial_SR = inverse_R1  # unread when there is one split
    if splits > 1:
        partial_SR = torch.empty((splits, R), dtype=torch.int32, device=t_RC.device)
        _chunk_amax_kernel[grid](bits_RC, partial_SR, R, C, chunk, *t_RC.stride(),
                                 IS_BF16=is_bf16, BLOCK_R=block_r, BLOCK_C=block_c,
                                 num_warps=num_warps)
    _quantize_kernel[grid](bits_RC, partial_SR, q_RC.view(torch.uint8), inverse_R1, R, C, chunk,
                           splits, *t_RC.stride(), IS_BF16=is_bf16, BLOCK_R=block_r,
                           BLOCK_C=block_c, BLOCK_S=next_power_of_2(splits),
                           num_warps=num_warps)
    return q_RC, inverse_R1
