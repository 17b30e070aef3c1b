"""The fused router's second stage on CUDA: from the chosen experts to each assignment's queue
slot, the drops, the counts and the losses, and on the dropless path the expert-sorted dispatch
plan. The launches and why they are shaped so: moeflow.ops.routing_triton, which chooses the
experts (with moeflow.ops.routing_choice_triton) and launches these kernels.

Capacity path: `_queue_kernel` (one program walking every block, or a histogram pass, the
block scan `_scan_kernel` and a slot pass), then `_finalize_kernel`. Dropless path:
`_dropless_scan_kernel`, then `_dropless_plan_kernel`. `store_losses` is shared with the decode
router (moeflow.ops.decode_route_triton).

Legend: T tokens, E experts, K top-k, N = T·K assignments, NB token blocks.
"""

import triton
import triton.language as tl


@triton.jit
def _queue_block(ids_ptr, order_ptr, w_ptr, slots_ptr, kept_ptr, base, p0, T, N, capacity,
                 cols, K: tl.constexpr, HAS_ORDER: tl.constexpr, WRITE: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    """One block of priority positions: returns its per-expert histogram; WRITE stores slots."""
    p = p0 + tl.arange(0, BLOCK_P)
    valid = p < N
    k = p // T
    j = p % T
    if HAS_ORDER:
        t = tl.load(order_ptr + j, mask=valid, other=0)
    else:
        t = j
    flat = t.to(tl.int64) * K + k
    e = tl.load(ids_ptr + flat, mask=valid, other=0).to(tl.int32)
    onehot = ((e[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
    if WRITE:
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
        slot = tl.sum(onehot * base[None, :], axis=1) + rank
        kept = slot < capacity
        tl.store(slots_ptr + flat, slot.to(tl.int64), mask=valid)
        tl.store(kept_ptr + flat, kept.to(tl.int8), mask=valid)
        w = tl.load(w_ptr + flat, mask=valid, other=0.0)
        tl.store(w_ptr + flat, tl.where(kept, w, 0.0), mask=valid)
    return tl.sum(onehot, axis=0)


@triton.jit
def _queue_kernel(ids_ptr, order_ptr, w_ptr, slots_ptr, kept_ptr, offsets_ptr, hist_ptr,
                  counts_before_ptr, T, E, N, capacity,
                  K: tl.constexpr, HAS_ORDER: tl.constexpr, MODE: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """MODE 0: one program, all blocks in turn. MODE 1: histogram per block. MODE 2: slots."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    if MODE == 0:
        running = tl.zeros([BLOCK_E], tl.int32)
        for p0 in range(0, N, BLOCK_P):
            running += _queue_block(ids_ptr, order_ptr, w_ptr, slots_ptr, kept_ptr, running, p0,
                                    T, N, capacity, cols, K, HAS_ORDER, True, BLOCK_P)
        tl.store(counts_before_ptr + cols, running.to(tl.int64), mask=cmask)
    elif MODE == 1:
        hist = _queue_block(ids_ptr, order_ptr, w_ptr, slots_ptr, kept_ptr, cols * 0,
                            pid * BLOCK_P, T, N, capacity, cols, K, HAS_ORDER, False, BLOCK_P)
        tl.store(hist_ptr + pid * E + cols, hist, mask=cmask)
    else:
        base = tl.load(offsets_ptr + pid * E + cols, mask=cmask, other=0)
        _queue_block(ids_ptr, order_ptr, w_ptr, slots_ptr, kept_ptr, base, pid * BLOCK_P,
                     T, N, capacity, cols, K, HAS_ORDER, True, BLOCK_P)


@triton.jit
def _scan_rows(hist_ptr, offsets_ptr, row0, NR, E, cols, cmask, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """offsets[row0 + r] = Σ_{r' < r} hist[row0 + r'] for the NR rows of [rows, E] histograms
    from row0, over the columns `cols`, BLOCK_R rows per step; returns the column totals."""
    running = tl.zeros([BLOCK_C], tl.int32)
    for r0 in range(0, NR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < NR)[:, None] & cmask[None, :]
        offs = (row0 + r)[:, None].to(tl.int64) * E + cols[None, :]
        h = tl.load(hist_ptr + offs, mask=m, other=0)
        tl.store(offsets_ptr + offs, tl.cumsum(h, axis=0) - h + running[None, :], mask=m)
        running += tl.sum(h, axis=0)
    return running


@triton.jit
def _scan_kernel(hist_ptr, offsets_ptr, counts_before_ptr, NPB, E,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exclusive prefix sum of the per-block histograms down the blocks, one program per column
    tile of experts, BLOCK_R blocks per step (torch's cumsum over dim 0 walks the rows one by
    one: 0.35 ms for 2048 blocks × 128 experts on an H100). Also writes the totals."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < E
    running = _scan_rows(hist_ptr, offsets_ptr, 0, NPB, E, cols, cmask, BLOCK_R, BLOCK_C)
    tl.store(counts_before_ptr + cols, running.to(tl.int64), mask=cmask)


@triton.jit
def _finalize_kernel(counts_before_ptr, balance_ptr, psum_ptr, lse_ptr, counts_ptr, dropped_ptr,
                     loss_ptr, T, E, NB, capacity, aux_coef, z_coef,
                     K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_B: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    before = tl.load(counts_before_ptr + cols, mask=cmask, other=0)
    counts = tl.minimum(before, capacity)
    tl.store(counts_ptr + cols, counts, mask=cmask)
    tl.store(dropped_ptr, T * K - tl.sum(counts))
    p_e = tl.zeros([BLOCK_E], tl.float32)
    # A tile of blocks per step, 64 KB of fp32 over 8 warps: no serial chain of NB loads. With
    # 4 KB tiles and 4 warps this one program took 15.6 µs per layer of a 2048-token prefill of
    # the Qwen3-30B-A3B shape on an H200 (256 blocks: 8 dependent steps).
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        tile = tl.load(psum_ptr + b[:, None] * E + cols[None, :],
                       mask=(b < NB)[:, None] & cmask[None, :], other=0.0)
        p_e += tl.sum(tile, axis=0)
    balance = tl.load(balance_ptr + cols, mask=cmask, other=0)
    zacc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        r = t0 + tl.arange(0, BLOCK_T)
        lse = tl.load(lse_ptr + r, mask=r < T, other=0.0)
        zacc += lse * lse
    store_losses(loss_ptr, balance, p_e, tl.sum(zacc), T, E, aux_coef, z_coef)


@triton.jit
def store_losses(loss_ptr, balance, p_e, lse_sq_sum, T, E, aux_coef, z_coef):
    """losses = (aux, z, the weighted sum the router returns as `loss`) from the balance counts
    and balance probability sums per expert and Σ logsumexp² over the T tokens: aux = E·Σ f_e·P_e
    with f_e = balance_e / Σ balance and P_e = p_e / T, z = mean lse²."""
    frac = balance.to(tl.float32) / tl.maximum(tl.sum(balance), 1).to(tl.float32)
    aux = E * tl.sum(frac * p_e / tl.maximum(T, 1))
    z = lse_sq_sum / tl.maximum(T, 1)
    tl.store(loss_ptr, aux)
    tl.store(loss_ptr + 1, z)
    # A term whose coefficient is 0 stays out: z overflows to inf for huge logits, 0·inf = NaN.
    tl.store(loss_ptr + 2, tl.where(aux_coef != 0.0, aux_coef * aux, 0.0)
             + tl.where(z_coef != 0.0, z_coef * z, 0.0))


@triton.jit
def _dropless_scan_kernel(hist_ptr, offsets_ptr, totals_ptr, psum_ptr, lse_ptr, pe_part_ptr,
                          z_part_ptr, T, E, NB, K: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Program (k, column tile): exclusive prefix sums of choice k's block histograms down the
    token blocks, and choice k's totals per expert; besides, a 1/K share of the blocks' balance
    probability sums and a share of the tokens' logsumexp², for the losses."""
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < E
    totals = _scan_rows(hist_ptr, offsets_ptr, k * NB, NB, E, cols, cmask, BLOCK_R, BLOCK_C)
    tl.store(totals_ptr + k * E + cols, totals, mask=cmask)

    per_k = tl.cdiv(NB, K)
    end = tl.minimum((k + 1) * per_k, NB)
    p_e = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(k * per_k, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < end)[:, None] & cmask[None, :]
        p_e += tl.sum(tl.load(psum_ptr + r[:, None].to(tl.int64) * E + cols[None, :], mask=m,
                              other=0.0), axis=0)
    tl.store(pe_part_ptr + k * E + cols, p_e, mask=cmask)

    q = k * tl.num_programs(1) + tl.program_id(1)
    per_q = tl.cdiv(T, K * tl.num_programs(1))
    t_end = tl.minimum((q + 1) * per_q, T)
    zacc = tl.zeros([BLOCK_Z], tl.float32)
    for t0 in range(q * per_q, t_end, BLOCK_Z):
        t = t0 + tl.arange(0, BLOCK_Z)
        lse = tl.load(lse_ptr + t, mask=t < t_end, other=0.0)
        zacc += lse * lse
    tl.store(z_part_ptr + q, tl.sum(zacc))


@triton.jit
def _dropless_plan_kernel(ids_ptr, hist_ptr, offsets_ptr, totals_ptr, pe_part_ptr, z_part_ptr,
                          slots_ptr, kept_ptr, row_ptr, token_ptr, ends_ptr, counts_ptr,
                          balance_ptr, dropped_ptr, loss_ptr, T, E, NB, NQ, aux_coef, z_coef,
                          K: tl.constexpr, FIRST_CHOICE_BALANCE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_Q: tl.constexpr):
    """Program per token block (the top-k kernel's blocks): each assignment's queue slot =
    (assignments of earlier choices to its expert) + (earlier blocks', this choice) + (its rank
    among this block's); dropless, so its sorted row is start[e] + slot. Program 0 also writes
    ends, counts, the balance counts and the losses.

    The per-(choice, expert) bases are a [K, E] tile, but each assignment needs the entry of its
    own expert: the program stores the tile over its block's own entries of the scan's offsets
    (slot bases) and of the top-k's histogram (row bases; the scan has read it), which no other
    program touches, and loads each assignment's entry back after a barrier (bar.sync orders a
    CTA's global stores before its later loads). The rank is a pairwise compare of the block's
    tokens. The first version took both from [BLOCK_T, K, E] one-hot tiles: 466 µs per
    2048-token prefill of the Qwen3-30B-A3B shape on the H200 (9.7 µs per layer)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    kk = tl.arange(0, BLOCK_K)
    km = (kk < K)[:, None] & cmask[None, :]
    totals = tl.load(totals_ptr + kk[:, None] * E + cols[None, :], mask=km, other=0)
    counts = tl.sum(totals, axis=0)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    if pid == 0:
        tl.store(ends_ptr + cols, ends.to(tl.int64), mask=cmask)
        tl.store(counts_ptr + cols, counts.to(tl.int64), mask=cmask)
        tl.store(dropped_ptr, (T * K - tl.sum(counts)).to(tl.int64))
        if FIRST_CHOICE_BALANCE:
            balance = tl.sum(tl.where(kk[:, None] == 0, totals, 0), axis=0)
        else:
            balance = counts
        tl.store(balance_ptr + cols, balance.to(tl.int64), mask=cmask)
        p_e = tl.sum(tl.load(pe_part_ptr + kk[:, None] * E + cols[None, :], mask=km, other=0.0),
                     axis=0)
        qs = tl.arange(0, BLOCK_Q)
        store_losses(loss_ptr, balance, p_e,
                     tl.sum(tl.load(z_part_ptr + qs, mask=qs < NQ, other=0.0)), T, E, aux_coef,
                     z_coef)

    # Queue position of the block's first (choice k, expert e) assignment: every earlier
    # choice's assignments to e, then the earlier blocks' of choice k; its row adds start[e].
    own = (kk[:, None] * NB + pid) * E + cols[None, :]
    slot_base = (tl.cumsum(totals, axis=0) - totals
                 + tl.load(offsets_ptr + own, mask=km, other=0))
    tl.store(offsets_ptr + own, slot_base, mask=km)
    tl.store(hist_ptr + own, slot_base + starts[None, :], mask=km)
    tl.debug_barrier()

    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    m2 = (rows < T)[:, None] & (kk < K)[None, :]
    flat = rows[:, None].to(tl.int64) * K + kk[None, :]
    e = tl.load(ids_ptr + flat, mask=m2, other=0).to(tl.int32)
    # Rank among the block's assignments of the same choice and expert, by token.
    tt = tl.arange(0, BLOCK_T)
    earlier = (tt[None, :] < tt[:, None])[:, :, None]  # [t, t', 1]: t' before t
    same = e[:, None, :] == e[None, :, :]  # [t, t', k]
    rank = tl.sum((same & earlier & m2[None, :, :]).to(tl.int32), axis=1)
    mine = (kk[None, :] * NB + pid) * E + e
    slot = tl.load(offsets_ptr + mine, mask=m2, other=0) + rank
    row = tl.load(hist_ptr + mine, mask=m2, other=0) + rank
    tl.store(slots_ptr + flat, slot.to(tl.int64), mask=m2)
    tl.store(kept_ptr + flat, tl.full([BLOCK_T, BLOCK_K], 1, tl.int8), mask=m2)
    tl.store(row_ptr + flat, row.to(tl.int64), mask=m2)
    tl.store(token_ptr + row, (rows[:, None] + kk[None, :] * 0).to(tl.int64), mask=m2)
