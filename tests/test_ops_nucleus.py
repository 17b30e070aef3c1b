"""Top-p without a sort (moeflow.ops.nucleus_triton): the nucleus its bounds keep is the one the
sampler's definition keeps (the smallest prefix of the row in the total order, value then
lower id, whose mass reaches p of the whole row's), by Python's sort and float64 sums as the
yardstick; rows of ties across the tiles' boundaries (one value throughout: the cut inside a
tie group), ±0 and subnormals, -inf, NaN, +inf; fp32, bf16, fp16; p of 1 beside p < 1. Then
the draw from those bounds against the reference's draw from a sort. Under Triton's
interpreter on tiny rows (16-logit tiles); on a GPU Qwen3-30B-A3B's vocabulary through
sample_tokens (tests/test_ops_sample.py)."""

import math

import pytest

from tests._triton_cpu import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.infer.sampling import (draw_key, draw_reference, ranked_candidates,  # noqa: E402
                                    row_mass)
from moeflow.ops.nucleus_triton import nucleus_bounds_triton  # noqa: E402
from moeflow.ops.sample_triton import draw_triton  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (temperature, top_p) per row, cycled
PARAMS = [(1.0, 0.91), (0.7, 0.55), (3.0, 0.33), (1.0, 1.0), (0.5, 0.999), (1.3, 0.04), (1.0, 0.62),
          (1e-30, 0.5)]  # a tiny temperature: mass 1 at the maxima, 0 elsewhere


def _rows(dtype: torch.dtype, V: int = 70) -> torch.Tensor:
    torch.manual_seed(7)
    x = torch.randint(-6, 7, (9, V)).float() / 2  # a coarse grid: ties in every row
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal of the dtype
    x[1, ::3] = -0.0
    x[1, 1::3] = 0.0
    x[1, [2, 8]] = tiny
    x[1, [5, 11]] = -tiny
    x[2, :] = -1.5  # one value throughout: the nucleus ends inside its tie group
    x[3, 5:40] = float("-inf")
    x[4, 3] = float("nan")
    x[4, 50] = -float("nan")
    x[5, :] = float("nan")
    x[6, [1, 60]] = float("inf")
    x[7] = torch.randn(V) * 4  # few ties
    x[8, :] = float("-inf")
    return x.to(dtype).to(DEVICE)


def _table(B: int, seed: int = 0, params=PARAMS) -> torch.Tensor:
    return torch.tensor([(params[(b + seed) % len(params)][0], 0,
                          params[(b + seed) % len(params)][1], *draw_key(seed, 40 + b), b)
                         for b in range(B)], dtype=torch.float64, device=DEVICE)


def _nucleus(row: list[float], temperature: float, p: float) -> set[int]:
    """The ids the sampler's definition keeps, in float64 after fp32's x and exp; asserts that
    no logit's mass before it lies within 1e-5 of the limit unless equal to it (where fp32 sums
    in another order could decide otherwise, and the yardstick would not be one; equal: sums of
    whole masses, exact in both)."""
    def key(i):
        return (0, 0.0, i) if math.isnan(row[i]) else (1, -row[i], i)
    order = sorted(range(len(row)), key=key)
    best = torch.tensor(row[order[0]], dtype=torch.float32)
    x = (torch.tensor(row, dtype=torch.float32) - best) / torch.tensor(temperature)
    e = x.nan_to_num_(0.0).exp().double()
    limit = p * e.sum().item()
    kept, before = set(), 0.0
    for i in order:
        if p < 1.0:
            assert before == limit or abs(before - limit) > 1e-5 * limit, (row, temperature, p)
            if before >= limit:
                break
        kept.add(i)
        before += e[i].item()
    return kept


def _kept(logits: torch.Tensor, bounds: torch.Tensor) -> list[set[int]]:
    """The ids each row's bounds keep (order keys as the kernels make them, by Python)."""
    bits = 8 * logits.element_size()
    signed = {16: torch.int16, 32: torch.int32}[bits]
    rows = []
    for b, (t, cut) in enumerate(bounds.tolist()):
        raw = logits[b].cpu().view(signed).long()
        magnitude = (1 << (bits - 1)) - 1
        ordered = torch.where(raw >= 0, raw, raw ^ magnitude)
        ordered = torch.where((raw & magnitude) == 0, 0, ordered)
        ordered = torch.where(logits[b].cpu().isnan(), magnitude, ordered)
        key = (ordered + (1 << (bits - 1))).tolist()
        rows.append({i for i, u in enumerate(key) if u > t or (u == t and i < cut)})
    return rows


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bounds_keep_the_nucleus_of_the_sorted_row(dtype):
    logits = _rows(dtype)
    B = logits.shape[0]
    for seed in range(3):
        table = _table(B, seed)
        tickets = torch.zeros(B, dtype=torch.int32, device=DEVICE)
        bounds = nucleus_bounds_triton(logits, table, logits.float().argmax(dim=-1), tickets)
        assert not tickets.any()  # left at 0 for the next launch
        got = _kept(logits, bounds)
        for b in range(B):
            temperature, _, p = table[b, :3].tolist()
            want = _nucleus(logits[b].float().tolist(), temperature, p)
            assert got[b] == want, (seed, b, sorted(got[b]), sorted(want))
        sizes = [len(k) for k in got]
        assert 1 in sizes and logits.shape[1] in sizes and len(set(sizes)) > 4  # not all or one


def test_a_tie_group_is_cut_at_the_first_logit_to_reach_p_across_tiles():
    """One value throughout 70 logits (five tiles), each of mass 1: p of the row keeps the
    first ⌈70 p⌉ ids, exactly 70 p where that is whole (the logit reaching it is kept, the
    next is not); where the mass of a whole value reaches it exactly, no lower one is kept."""
    logits = torch.full((5, 70), 0.25, device=DEVICE)
    logits[4, 0::2] = float("nan")  # above the 0.25s, every x NaN: 0, each of mass 1
    params = [(1.0, 0.5), (1.0, 0.01), (1.0, 0.999), (1.0, 17 / 70), (1.0, 0.5)]
    table = _table(5, params=params)
    bounds = nucleus_bounds_triton(logits, table, torch.zeros(5, dtype=torch.int64,
                                                              device=DEVICE))
    kept = _kept(logits, bounds)
    assert [len(k) for k in kept] == [35, 1, 70, 17, 35]
    assert bounds[:4, 1].tolist() == [35, 1, 70, 17]  # the cut: one past the last id kept
    assert kept[4] == set(range(0, 70, 2))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_draw_inside_the_bounds_is_the_references_draw_from_a_sort(dtype):
    logits = _rows(dtype)
    B = logits.shape[0]
    argmax = logits.float().argmax(dim=-1)
    values, ids = ranked_candidates(logits, None)
    filler = torch.arange(100, 100 + B, device=DEVICE)
    drawn = set()
    for seed in range(2):
        table = _table(B, seed)
        bounds = nucleus_bounds_triton(logits, table, argmax)
        got = draw_triton(logits, None, table, filler.clone(), ranked=False, top_p=True,
                          argmax_B=argmax, bounds_S2=bounds)
        ref = draw_reference(values, ids, table, filler.clone(), ranked=True, top_p=True,
                             row_mass_S1=row_mass(logits, table))
        assert torch.equal(got, ref), (seed, got, ref)
        drawn.update(got.tolist())
    assert len(drawn) > B  # rows drew different tokens under different keys


def test_bad_inputs_are_named_in_one_line():
    logits = torch.randn(2, 40, device=DEVICE)
    table = _table(2)
    argmax = logits.argmax(dim=-1)
    with pytest.raises(ValueError, match="fp32/bf16/fp16 logits with contiguous rows"):
        nucleus_bounds_triton(logits.double(), table, argmax)
    with pytest.raises(ValueError, match=r"table must be contiguous float64 \[S, 6\]"):
        nucleus_bounds_triton(logits, table.float(), argmax)
    with pytest.raises(ValueError, match=r"argmax must be contiguous int64 \[2\]"):
        nucleus_bounds_triton(logits, table, argmax.int())
    with pytest.raises(ValueError, match="tickets must be int32 zeros, at least 2"):
        nucleus_bounds_triton(logits, table, argmax, torch.zeros(1, dtype=torch.int32,
                                                                 device=DEVICE))
    with pytest.raises(ValueError, match="top-p over whole rows needs their nuclei's bounds"):
        draw_triton(logits, None, table, argmax.clone(), ranked=False, top_p=True,
                    argmax_B=argmax)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_mixed_batch_on_the_kernels_draws_what_the_torch_path_draws(monkeypatch):
    """sample_tokens' CUDA path (forced here, the kernels interpreted): rows with a top-k drawn
    from one top-k launch, the rest from their whole rows inside their nuclei's bounds, greedy
    rows left their argmax; the same tokens as the plain-torch path (a sort, row_mass)."""
    from moeflow.infer import sampling
    from moeflow.infer.sampling import SamplingParams, sample_tokens

    logits = _rows(torch.bfloat16)
    B = logits.shape[0]
    kinds = [dict(temperature=0.0), dict(temperature=0.9, top_k=5),
             dict(temperature=1.1, top_p=0.55), dict(temperature=0.8),
             dict(temperature=0.7, top_k=9, top_p=0.62), dict(temperature=1.3, top_p=0.91)]
    params = [SamplingParams(**kinds[(b * 5) % len(kinds)]) for b in range(B)]
    assert len({(p.greedy, p.top_k > 0, p.top_p < 1) for p in params}) == 5
    for seed in range(2):
        seeds, positions = [seed * 10 + b for b in range(B)], [30 + b for b in range(B)]
        monkeypatch.setattr(sampling, "_use_kernel", lambda x: True)
        got = sample_tokens(logits, params, seeds, positions,
                            tickets=torch.zeros(B, dtype=torch.int32, device=DEVICE))
        monkeypatch.setattr(sampling, "_use_kernel", lambda x: False)
        assert torch.equal(got, sample_tokens(logits, params, seeds, positions)), seed
