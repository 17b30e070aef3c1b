"""Each row's argmax over a decode step's logits as one Triton launch: the greedy tokens.

Why: torch's argmax over one row of a 151,936-token vocabulary is one reduction kernel that
reads the row with a single block of threads: 8.3 µs of every batch-1 decode step of the
Qwen3-30B-A3B shape (H200, session 32), after the LM head and on the step's critical path. Here
each row is cut into tiles of BLOCK logits, one program per (row, tile) finds its tile's best,
stores it as a partial, and the last program of the row to arrive (moeflow.ops.tickets) reduces
the partials and stores the row's token: one round of loads spread over the GPU, one launch.

Measured in the served batch-1 graph (H200, session 33, benchmarks/results/decode_served), with
the expert counts moved beside the LM head in the same change: graph replay 2.483-2.488 ->
2.467-2.473 ms, served 2.529-2.555 -> 2.498-2.520.

Same result as `torch.argmax(logits_BV, dim=-1)`, bit for bit: the values are compared exactly
(bf16 and fp16 widen to fp32 exactly); ties go to the lowest index; a NaN counts as the largest
value (the first NaN wins), as torch has it. Forward only; B rows of V logits, any float dtype,
the last dim contiguous. With a token ring (moeflow.infer.token_ring: a decode step's tokens
published to the host by the kernel itself) each row's last program also writes its token
there, and the last of the rows advances the ring's count.

Legend: B rows, V logits per row, P tiles per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.infer.token_ring import SLOTS, TAG_MOD, TokenRing
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.pdl import launch_next, pdl_launch, wait_for_previous
from moeflow.ops.tickets import last_to_arrive

# Logits per program: 151,936 → 38 programs per row (8 KB of bf16 each).
BLOCK = 4096
INTERPRETER_BLOCK = 16  # the CPU tests' tiles: several per row


@triton.jit
def _best(values, index, valid, NO_INDEX: tl.constexpr):
    """(value, index) of the best of `values` (fp32) at `index` where `valid`: the first NaN
    if there is one (value NaN), else the largest, ties to the lowest index."""
    nan = (values != values) & valid
    nan_at = tl.min(tl.where(nan, index, NO_INDEX), axis=0)
    finite = tl.where(nan | ~valid, float("-inf"), values)
    top = tl.max(finite, axis=0)
    top_at = tl.min(tl.where(valid & (finite == top), index, NO_INDEX), axis=0)
    has_nan = nan_at < NO_INDEX
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_at, top_at)


@triton.jit
def _argmax_kernel(x_ptr, stride_b, V, val_ptr, idx_ptr, out_ptr, tickets_ptr, P, B,
                   words_ptr, seq_ptr, ring_cols, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                   PDL: tl.constexpr, PUBLISH: tl.constexpr, RING_SLOTS: tl.constexpr,
                   TAG_MOD: tl.constexpr):
    wait_for_previous(PDL)
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + b * stride_b + offs, mask=valid, other=0.0).to(tl.float32)
    launch_next(PDL)
    value, at = _best(x, offs, valid, 2147483647)
    tl.store(val_ptr + b * P + p, value)
    tl.store(idx_ptr + b * P + p, at)
    if last_to_arrive(tickets_ptr + b, P):
        ps = tl.arange(0, BLOCK_P)
        pmask = ps < P
        # Through L2 (.cg): the other programs' partials, not this SM's L1 copy.
        vals = tl.load(val_ptr + b * P + ps, mask=pmask, other=0.0, cache_modifier=".cg")
        idxs = tl.load(idx_ptr + b * P + ps, mask=pmask, other=0, cache_modifier=".cg")
        # Tiles are in index order, so the lowest index among ties is the lowest tile's.
        _, at = _best(vals, idxs, pmask, 2147483647)
        tl.store(out_ptr + b, at.to(tl.int64))
        if PUBLISH:  # moeflow.infer.token_ring: one word (tag, token) into the host's ring
            seq = tl.load(seq_ptr, cache_modifier=".cg")
            word = ((seq % TAG_MOD + 1) << 32) | at.to(tl.int64)
            tl.store(words_ptr + (seq % RING_SLOTS) * ring_cols + b, word)
            # The rows' last: every row has read seq (the ticket's release orders the load).
            if last_to_arrive(tickets_ptr + B, B):
                tl.store(seq_ptr, seq + 1)


def argmax_rows_triton(logits_BV: torch.Tensor, tickets: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, ring: TokenRing | None = None
                       ) -> torch.Tensor:
    """torch.argmax(logits_BV, dim=-1) as one launch: [B] int64. `tickets`: int32 zeros, at
    least B (B + 1 with a ring), on the logits' device, left at 0 (moeflow.ops.tickets; None:
    made here, one launch at a time may share them). `out`: a contiguous [B] int64 tensor on
    that device to write the ids into (returned). `ring`: also publish them there as one step
    (moeflow.infer.token_ring; its rows at least B)."""
    if logits_BV.dim() != 2 or logits_BV.shape[1] == 0:
        raise ValueError(f"argmax_rows: logits must be [B, V] with V > 0, got "
                         f"{tuple(logits_BV.shape)}")
    if not logits_BV.is_floating_point():
        raise ValueError(f"argmax_rows: logits must be floating point, got {logits_BV.dtype}")
    B, V = logits_BV.shape
    if V >= 2 ** 31 - 1:
        raise ValueError(f"argmax_rows: {V} logits per row is more than int32 indexes")
    device = logits_BV.device
    counters = B + (ring is not None)
    if tickets is None:
        tickets = torch.zeros(counters, dtype=torch.int32, device=device)
    elif tickets.dtype != torch.int32 or tickets.numel() < counters or tickets.device != device:
        raise ValueError(f"argmax_rows: tickets must be int32 zeros, at least {counters}, on "
                         f"{device}; got {tickets.dtype} [{tickets.numel()}] on "
                         f"{tickets.device}")
    if ring is not None and (ring.rows < B or ring.device != device):
        raise ValueError(f"argmax_rows: the token ring must hold {B} rows on {device}; it "
                         f"holds {ring.rows} on {ring.device}")
    if out is None:
        out_B = torch.empty(B, dtype=torch.int64, device=device)
    elif out.shape != (B,) or out.dtype != torch.int64 or out.device != device or (
            B > 1 and out.stride(0) != 1):
        raise ValueError(f"argmax_rows: out must be a contiguous [{B}] int64 tensor on "
                         f"{device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        out_B = out
    if B == 0:
        return out_B
    x_BV = logits_BV if logits_BV.stride(1) == 1 else logits_BV.contiguous()
    block = BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    block = min(block, next_power_of_2(V))
    P = cdiv(V, block)
    vals_BP = torch.empty(B, P, dtype=torch.float32, device=device)
    idxs_BP = torch.empty(B, P, dtype=torch.int32, device=device)
    words, seq = (out_B, out_B) if ring is None else (ring.words_RN, ring.seq_1)
    _argmax_kernel[(B, P)](x_BV, x_BV.stride(0), V, vals_BP, idxs_BP, out_B, tickets, P, B,
                           words, seq, words.shape[-1], BLOCK=block,
                           BLOCK_P=next_power_of_2(P), PUBLISH=ring is not None,
                           RING_SLOTS=SLOTS, TAG_MOD=TAG_MOD, num_warps=4,
                           **pdl_launch(x_BV))
    return out_B
