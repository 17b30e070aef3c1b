"""The one-launch top-k (moeflow.ops.top_k_triton) and ranked_candidates' torch paths (a top-k
refilled, a sort of every logit) against the total order they promise (value, NaN first, -0 as
+0, then the lower id), bit for bit: Python's sort of the logits as the yardstick, rows full of
ties across the k-th value and the tiles' boundaries, ±0 and subnormals beside each other, -inf,
NaN (fewer and more than k), one value throughout; fp32, bf16, fp16; k of 1, of a tile, past a
tile and the whole row. Under Triton's interpreter on tiny rows (16-logit tiles); on a GPU also
Qwen3-30B-A3B's vocabulary."""

import math

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.infer.sampling import _ranked_top_k, ranked_candidates  # noqa: E402
from moeflow.ops.top_k_triton import MAX_K, top_k_tile, top_k_triton  # noqa: E402

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _spec(logits: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's first k ids in the total order, by Python's sort."""
    def order(row):
        return sorted(range(len(row)), key=lambda i: (0, 0.0, i) if math.isnan(row[i])
                      else (1, -row[i], i))
    return [order(row)[:k] for row in logits.float().tolist()]


def _rows(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(5)
    B, V = 7, 70  # five 16-logit tiles
    x = torch.randint(-4, 5, (B, V)).float() / 2  # a coarse grid: ties at every k-th value
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal of the dtype
    x[1, ::3] = -0.0
    x[1, 1::3] = 0.0
    x[1, [2, 8]] = tiny
    x[1, [5, 11]] = -tiny
    x[2, :] = 1.5  # one tie group holding the whole row
    x[3, 5:40] = float("-inf")
    x[4, 3] = float("nan")
    x[4, 50] = -float("nan")  # the sign bit set
    x[5, :] = float("nan")
    x[6, ::2] = float("nan")  # 35 NaNs: more than most k
    x[6, 1] = float("inf")
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", list(BITS))
def test_top_k_follows_the_total_order_bit_for_bit(dtype):
    logits = _rows(dtype)
    B, V = logits.shape
    tickets = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    for k in (1, 7, 16, 33, V):
        want = torch.tensor(_spec(logits, k), device=DEVICE)
        for path in ("kernel", "torch", "sort"):
            if path == "kernel":
                values, ids = top_k_triton(logits, k, tickets)
                assert not tickets.any()  # left at 0 for the next launch
            elif path == "torch":
                values, ids = _ranked_top_k(logits, k)
            else:  # every candidate (top-p alone), sorted by order_keys
                values, ids = (t[:, :k] for t in ranked_candidates(logits, None))
            assert torch.equal(ids, want), (path, k, ids, want)
            assert values.dtype == dtype and torch.equal(  # the logits' own bits (-0 stays -0)
                values.view(BITS[dtype]), logits.gather(1, want).view(BITS[dtype]))


def test_tiles_keep_a_rows_candidates_within_one_program():
    assert top_k_tile(151936, 40) == 4096  # 38 programs a row, 1,520 candidates
    assert top_k_tile(151936, 215) == 4096
    assert top_k_tile(151936, 216) == 8192  # 38 · 216 > 8,192
    assert top_k_tile(151936, MAX_K) == 32768  # 5 tiles, 5,120 candidates
    assert top_k_tile(70, 7, interpreting=True) == 16
    assert top_k_tile(70, 33, interpreting=True) == 64  # at least k
    assert top_k_tile(100, 100, interpreting=True) == 128  # one tile holds the row


def test_bad_top_k_requests_are_named():
    x = torch.zeros(2, 10, device=DEVICE)
    for bad in (lambda: top_k_triton(x, 0), lambda: top_k_triton(x, 11),
                lambda: top_k_triton(x.t(), 1), lambda: top_k_triton(x.long(), 1)):
        with pytest.raises(ValueError, match="top-k: 1 to min"):
            bad()
    with pytest.raises(ValueError, match="tickets must be int32 zeros, at least 2"):
        top_k_triton(x, 1, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    values, ids = top_k_triton(x[:0], 3)
    assert values.shape == ids.shape == (0, 3)


@pytest.mark.skipif(not ON_GPU, reason="the full vocabulary needs a GPU (interpreter: minutes)")
@pytest.mark.parametrize("dtype", list(BITS))
def test_top_k_at_qwen3s_vocabulary_matches_a_stable_sort(dtype):
    """The launcher's tiles (38 a row at k = 40, 5 at 1,024), 16 rows with bf16-sized ties,
    against the stable sort of every logit's order key (torch's float sort on CUDA does not
    rank NaN as the order does)."""
    torch.manual_seed(6)
    logits = (torch.randn(16, 151936, device=DEVICE) * 4).bfloat16().to(dtype)
    logits[3, 1000:1100] = float("nan")
    logits[5, :] = 0.0
    for k in (1, 40, 1024):
        values, ids = top_k_triton(logits, k)
        want_v, want_i = ranked_candidates(logits, None)
        assert torch.equal(ids, want_i[:, :k]), k
        assert torch.equal(values.view(BITS[dtype]), want_v[:, :k].view(BITS[dtype]))


@pytest.mark.parametrize("dtype", list(BITS))
def test_order_keys_rank_nan_first_and_zeros_equal(dtype):
    """The integer keys the torch paths sort by (torch's float sort on CUDA ranked a sign-bit
    NaN last, and in a short bf16 row every NaN): NaN of either sign above +inf, -0 equal to
    +0, subnormals apart from 0."""
    from moeflow.infer.sampling import order_keys

    tiny = torch.finfo(dtype).tiny / 4
    x = torch.tensor([-float("nan"), float("nan"), float("inf"), 1.0, tiny, 0.0, -0.0, -tiny,
                      -1.0, -float("inf")], dtype=dtype)
    keys = order_keys(x).tolist()
    assert keys[0] == keys[1] and keys[5] == keys[6]
    assert keys[1] > keys[2] > keys[3] > keys[4] > keys[5] and keys[6] > keys[7] > keys[8] > keys[9]
