"""Decode expert MLP with the up projection split along D: more programs in flight per SM.

Why (issue 14): at batch-1 decode of the Qwen3-30B-A3B shape the weight-streaming kernels of
moeflow.ops.grouped_mlp_triton read w_in at 2.66 TB/s and w_out at 2.25 TB/s on an H200 (peak
4.8). Only 8 experts × 12 column tiles = 96 up programs do work, fewer than the 132 SMs, one
program each, so too few loads are in flight to hide HBM latency; the down kernel's F loop is
short, so its fixed per-program cost weighs. This path launches more, shorter programs. It is
chosen only when asked for (Backends(experts="stream_splitk")); "auto" keeps "stream" until a
GPU has measured both (benchmarks/decode_experts.py).

Two kernels:
- `_up_partials_kernel`, grid (slots, F tiles, SPLIT_K): program (a, j, s) streams rows
  [s-th share of D's BLOCK_K chunks] of the j-th column tile of expert a's w_in (gate and up
  tiles together for SwiGLU) and writes its fp32 partial products to ws_NSI[:, s] — no bias,
  no activation.
- `_down_from_partials_kernel`, grid (slots, D tiles): for each BLOCK_K chunk of F it first
  rebuilds h for its rows: the SPLIT_K partials summed in the fixed order s = 0, 1, ..., plus
  b_in, the activation in fp32, rounded to the model dtype with the stream path's expression
  and cast (its `_gelu` included); then multiplies it into w_out. Every D tile re-reads its
  rows' partials (rows × SPLIT_K × I × 4 bytes: 197 KB in all at batch-1 Qwen3 with SPLIT_K 4,
  L2-resident) instead of a third launch writing h. Its config list has smaller column tiles
  than the stream kernel's: more programs per expert over the short F loop. Triton pipelines
  the partials through shared memory with the weight tiles, SPLIT_K × BLOCK_M × BLOCK_K fp32
  per stage (1 row of 16 is real at decode, but the space is reserved), so configs that would
  leave fewer than two programs per SM are pruned (`_down_fits`).

Deterministic: every workspace element is written by exactly one program and read back in a
fixed order; there are no atomics. The bits depend on the launch configuration (SPLIT_K and
BLOCK_K fix where fp32 sums round), which Triton's autotuner picks once per process and key,
as it picks the stream kernels' BLOCK_K. With SPLIT_K = 1 and the stream path's block sizes
the sums are the stream kernels' own (equal bit for bit under Triton's interpreter, tested);
with SPLIT_K > 1 the pre-activation is Σ_s (Σ_{k in share s}) instead of one running sum, so
it differs from the stream path's in fp32 rounding, and h (rounded to the model dtype) can
differ by one unit in its last place.

Idle experts: program a of the first grid axis takes the a-th expert that has rows, found by
scanning ends_E on the device (one load of ≤ 1024 entries and a prefix count, from L2), so the
grid has min(N, E) slots instead of E — at batch-1 top-8 of 128 experts, 8 instead of 128 —
and nearly every launched program streams weights; programs whose slot has no busy expert (N ≥
E, or rows shared) return at once. Keeping the stream path's early exit would have launched
SPLIT_K × 128 × tiles programs of which 15 in 16 exit. No host sync: the grid depends only on
N and E, so the call is capturable in a CUDA graph.

Workspace: fp32 ws_NSI, a row's SPLIT_K partials side by side (the down kernel reads them
together). It is allocated before the autotuner picks a SPLIT_K, for the largest one allowed
at this many rows per slot (`_split_capacity`; the autotuner prunes configs above it), and used
as [N, SPLIT_K, I]: its size depends on N, E and the weights' shapes only. The down kernel
must sum exactly the SPLIT_K the up kernel used, so the host reads the up kernel's chosen
config back from its autotuner (`best_config`, set for the call just launched: host metadata,
no sync) and passes it to the down kernel as a constant.

Legend: N expert-sorted rows, D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU),
E experts, S = SPLIT_K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# the stream path's GELU (the same h) and its up kernel's K loop
from moeflow.ops.grouped_mlp_triton import _gelu, gate_up_products
from moeflow.validate import check

MAX_EXPERTS = 1024  # the busy-expert scan holds ends_E in one block


@dataclass(frozen=True)
class SplitKLaunch:
    """One launch configuration of both kernels (instead of autotuning): the interpreter's fixed
    choice, and what tests and benchmarks use to force a SPLIT_K."""

    split_k: int = 2
    up_block_n: int = 32
    up_block_k: int = 32
    up_stages: int = 3
    down_block_n: int = 32
    down_block_k: int = 32
    down_stages: int = 2
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("split_k", "up_stages", "down_stages"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v,
                  "must be an integer >= 1")
        for name in ("up_block_n", "up_block_k", "down_block_n", "down_block_k"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 16 and v & (v - 1) == 0, name, v,
                  "must be a power of two >= 16")
        check(self.num_warps in (1, 2, 4, 8, 16), "num_warps", self.num_warps,
              "must be 1, 2, 4, 8 or 16")


INTERPRETER_LAUNCH = SplitKLaunch()

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); the first, without a split, is the control.
# Shared memory (sm_90, SwiGLU, BLOCK_M 16) is 54-108 KB per program: 2-4 programs per SM.
_UP_CONFIGS = ((64, 128, 1, 4, 4), (64, 128, 2, 4, 3), (64, 128, 4, 4, 3), (64, 64, 4, 4, 4),
               (128, 64, 2, 4, 3), (32, 128, 4, 4, 4), (32, 256, 2, 4, 3), (128, 64, 8, 4, 3))
# (BLOCK_N, BLOCK_K, num_warps, num_stages): smaller column tiles than the stream kernel's give
# more programs per expert; those the shared-memory budget refuses are pruned (_down_fits).
_DOWN_CONFIGS = ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (128, 64, 4, 2),
                 (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4))
# Software pipelining stages every tile a K step loads, the SPLIT_K fp32 partials included:
# (stages - 1) × (SPLIT_K × (2 if SwiGLU) × BLOCK_M × BLOCK_K × 4 + BLOCK_K × BLOCK_N × 2)
# bytes for bf16 weights; Triton 3.6 allocates that plus 2-4 KB of scratch on sm_90 (every
# config compiled for sm_90 and compared). Configs above this budget would leave fewer than
# two programs per SM of an H100/H200 (228 KB), against the point of the path.
_DOWN_SMEM_BUDGET = 96 * 1024
SPLIT_K_MAX = max(c[2] for c in _UP_CONFIGS)


def _split_capacity(rows_bucket: int) -> int:
    """The largest SPLIT_K the workspace holds: SPLIT_K × rows per slot ≤ SPLIT_K_MAX, so while
    splitting the workspace holds at most SPLIT_K_MAX rows of partials per slot (≤ 7.3 MB at
    the Qwen3-30B-A3B and Mixtral-8x7B shapes), and past SPLIT_K_MAX rows per slot one fp32
    pre-activation. Splitting is for decode's one or two rows per expert; a program with more
    rows already has more loads to overlap (a pass over its w_in tile per row tile)."""
    return max(1, SPLIT_K_MAX // rows_bucket)


def _fitting_configs(configs, named_args, **kwargs):
    """Up autotuner prune: only SPLIT_Ks the workspace (ws_NSI's middle axis) holds."""
    return [c for c in configs if c.kwargs["SPLIT_K"] <= named_args["ws_ptr"].shape[1]]


def _down_smem(config, SPLIT_K: int, SWIGLU: bool, BLOCK_M: int, w_bytes: int = 2) -> int:
    bk, bn = config.kwargs["BLOCK_K"], config.kwargs["BLOCK_N"]
    per_stage = SPLIT_K * (2 if SWIGLU else 1) * BLOCK_M * bk * 4 + bk * bn * w_bytes
    return max(1, config.num_stages - 1) * per_stage


def _down_fits(configs, named_args, **kwargs):
    """Down autotuner prune: configs within _DOWN_SMEM_BUDGET at this SPLIT_K (the smallest
    one if none is)."""
    w_bytes = named_args["w_ptr"].element_size()
    smem = {c: _down_smem(c, kwargs["SPLIT_K"], kwargs["SWIGLU"], kwargs["BLOCK_M"], w_bytes)
            for c in configs}
    return [c for c in configs if smem[c] <= _DOWN_SMEM_BUDGET] or [min(configs, key=smem.get)]


@triton.jit
def _busy_expert(ends_ptr, slot, E, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of the slot-th expert with rows; lo == hi when fewer than
    slot + 1 experts have rows."""
    idx = tl.arange(0, BLOCK_E)
    valid = idx < E
    hi_E = tl.load(ends_ptr + idx, mask=valid, other=0).to(tl.int32)
    lo_E = tl.load(ends_ptr + idx - 1, mask=valid & (idx > 0), other=0).to(tl.int32)
    busy = valid & (hi_E > lo_E)
    pick = busy & (tl.cumsum(busy.to(tl.int32), 0) == slot + 1)
    e = tl.sum(tl.where(pick, idx, 0))
    lo = tl.sum(tl.where(pick, lo_E, 0))
    hi = tl.sum(tl.where(pick, hi_E, 0))
    return e, lo, hi


@triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s},
                                        num_warps=w, num_stages=st)
                          for bn, bk, s, w, st in _UP_CONFIGS],
                 key=["D", "F", "ROWS_BUCKET", "SLOTS_BUCKET", "SWIGLU"], reset_to_zero=[],
                 prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit(do_not_specialize=["ROWS_BUCKET", "SLOTS_BUCKET"])  # autotune keys only
def _up_partials_kernel(x_ptr, token_ptr, ends_ptr, w_ptr, ws_ptr, D, F, E, ROWS_BUCKET,
                        SLOTS_BUCKET, SWIGLU: tl.constexpr, GATHER: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    e, lo, hi = _busy_expert(ends_ptr, tl.program_id(0), E, BLOCK_E)
    if hi <= lo:
        return
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    I = 2 * F if SWIGLU else F
    chunks = tl.cdiv(D, BLOCK_K)  # split s takes chunks [s·C/S, (s+1)·C/S): balanced shares
    k_lo = (s * chunks // SPLIT_K) * BLOCK_K
    k_hi = tl.minimum(((s + 1) * chunks // SPLIT_K) * BLOCK_K, D)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < F
    w_e = w_ptr + e.to(tl.int64) * D * I
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        acc_g, acc_u = gate_up_products(x_ptr, token_ptr, w_e, rows, rmask, n, nmask, k_lo,
                                        k_hi, D, F, I, SWIGLU, GATHER, BLOCK_M, BLOCK_N,
                                        BLOCK_K)
        out = ws_ptr + rows[:, None].to(tl.int64) * (SPLIT_K * I) + s * I + n[None, :]
        omask = rmask[:, None] & nmask[None, :]
        tl.store(out, acc_g, mask=omask)
        if SWIGLU:
            tl.store(out + F, acc_u, mask=omask)


@triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                                        num_stages=st) for bn, bk, w, st in _DOWN_CONFIGS],
                 key=["D", "F", "ROWS_BUCKET", "SLOTS_BUCKET", "SWIGLU", "SPLIT_K"],
                 reset_to_zero=[], prune_configs_by={"early_config_prune": _down_fits})
@triton.jit(do_not_specialize=["ROWS_BUCKET", "SLOTS_BUCKET"])  # autotune keys only
def _down_from_partials_kernel(ws_ptr, ends_ptr, b_in_ptr, w_ptr, b_out_ptr, y_ptr, D, F, E,
                               ROWS_BUCKET, SLOTS_BUCKET, SWIGLU: tl.constexpr,
                               HAS_BIAS_IN: tl.constexpr, HAS_BIAS_OUT: tl.constexpr,
                               SPLIT_K: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    e, lo, hi = _busy_expert(ends_ptr, tl.program_id(0), E, BLOCK_E)
    if hi <= lo:
        return
    I = 2 * F if SWIGLU else F
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    w_e = w_ptr + e.to(tl.int64) * F * D
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, F, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < F
            hmask = rmask[:, None] & kmask[None, :]
            part = ws_ptr + rows[:, None].to(tl.int64) * (SPLIT_K * I) + k[None, :]
            g = tl.load(part, mask=hmask, other=0.0)
            for s in tl.static_range(1, SPLIT_K):
                g += tl.load(part + s * I, mask=hmask, other=0.0)
            if HAS_BIAS_IN:
                g += tl.load(b_in_ptr + e * I + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                u = tl.load(part + F, mask=hmask, other=0.0)
                for s in tl.static_range(1, SPLIT_K):
                    u += tl.load(part + s * I + F, mask=hmask, other=0.0)
                if HAS_BIAS_IN:
                    u += tl.load(b_in_ptr + e * I + F + k, mask=kmask,
                                 other=0.0).to(tl.float32)[None, :]
                act = g * tl.sigmoid(g) * u
            else:
                act = _gelu(g)
            h = tl.where(hmask, act, 0.0).to(y_ptr.dtype.element_ty)
            w = tl.load(w_e + k[:, None] * D + n[None, :], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            acc = tl.dot(h, w, acc)
        if HAS_BIAS_OUT:
            acc += tl.load(b_out_ptr + e * D + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * D + n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def _workspace(N: int, split_k: int, I: int, device: torch.device) -> torch.Tensor:
    """The fp32 partial sums ws_NSI (uninitialised: every element read is written first)."""
    return torch.empty(N, split_k, I, dtype=torch.float32, device=device)


def tuned_configs() -> dict[str, str]:
    """The configs the autotuner chose for the latest call on CUDA (for benchmark records)."""
    return {name: str(getattr(kernel, "best_config", None))
            for name, kernel in (("up", _up_partials_kernel), ("down", _down_from_partials_kernel))}


def expert_mlp_stream_splitk(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                             b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                             b_out_ED: torch.Tensor | None, activation: str,
                             parked: bool = True, rows_N: torch.Tensor | None = None, *,
                             launch: SplitKLaunch | None = None) -> torch.Tensor:
    """expert_mlp_stream's contract (inference only; rows past ends_E[-1] left unwritten;
    `rows_N`: row n is x_ND[rows_N[n]], gathered by the up kernel) with the up projection split
    along D. `launch`: one fixed configuration instead of the autotuner (on CUDA);
    INTERPRETER_LAUNCH where Triton runs on the CPU."""
    N, D = x_ND.shape if rows_N is None else (rows_N.shape[0], x_ND.shape[1])
    E, F = w_out_EFD.shape[0], w_out_EFD.shape[1]
    if E > MAX_EXPERTS:
        raise ValueError(f"stream_splitk experts: {E} experts, at most {MAX_EXPERTS} (the busy-"
                         "expert scan holds ends_E in one block); use experts='stream'")
    swiglu = activation == "swiglu"
    I = w_in_EDI.shape[2]
    x_ND, w_in_EDI, w_out_EFD = x_ND.contiguous(), w_in_EDI.contiguous(), w_out_EFD.contiguous()
    ends = ends_E.contiguous()
    y_ND = torch.empty(N, D, dtype=x_ND.dtype, device=x_ND.device)
    if N == 0:
        return y_ND
    if launch is None and not x_ND.is_cuda:  # the interpreter cannot autotune
        launch = INTERPRETER_LAUNCH
    slots = min(N, E)  # at most this many experts have rows
    rows_bucket = triton.next_power_of_2(-(-N // slots))
    shape = dict(D=D, F=F, E=E, ROWS_BUCKET=rows_bucket,
                 SLOTS_BUCKET=triton.next_power_of_2(slots), SWIGLU=swiglu,
                 BLOCK_E=max(16, triton.next_power_of_2(E)),
                 BLOCK_M=16 if rows_bucket <= 16 else 32 if rows_bucket <= 32 else 64)
    capacity = _split_capacity(rows_bucket) if launch is None else launch.split_k
    ws_NSI = _workspace(N, capacity, I, x_ND.device)
    up_args = (x_ND, rows_N if rows_N is not None else ends, ends, w_in_EDI, ws_NSI)
    down_args = (ws_NSI, ends, b_in_EI if b_in_EI is not None else w_in_EDI, w_out_EFD,
                 b_out_ED if b_out_ED is not None else w_out_EFD, y_ND)
    flags = dict(HAS_BIAS_IN=b_in_EI is not None, HAS_BIAS_OUT=b_out_ED is not None)
    if launch is None:
        _up_partials_kernel[lambda m: (slots, triton.cdiv(F, m["BLOCK_N"]), m["SPLIT_K"])](
            *up_args, GATHER=rows_N is not None, **shape)
        split_k = _up_partials_kernel.best_config.kwargs["SPLIT_K"]
        _down_from_partials_kernel[lambda m: (slots, triton.cdiv(D, m["BLOCK_N"]))](
            *down_args, SPLIT_K=split_k, **flags, **shape)
        return y_ND
    _up_partials_kernel.fn[(slots, triton.cdiv(F, launch.up_block_n), launch.split_k)](
        *up_args, GATHER=rows_N is not None, BLOCK_N=launch.up_block_n,
        BLOCK_K=launch.up_block_k, SPLIT_K=launch.split_k, **shape,
        num_warps=launch.num_warps, num_stages=launch.up_stages)
    _down_from_partials_kernel.fn[(slots, triton.cdiv(D, launch.down_block_n))](
        *down_args, SPLIT_K=launch.split_k, BLOCK_N=launch.down_block_n,
        BLOCK_K=launch.down_block_k, **flags, **shape, num_warps=launch.num_warps,
        num_stages=launch.down_stages)
    return y_ND
