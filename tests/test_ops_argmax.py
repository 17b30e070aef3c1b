"""The greedy tokens' one-launch argmax (moeflow.ops.argmax_triton) against torch.argmax, bit for
bit: ties to the lowest index, a NaN as the largest value, rows all -inf, a vocabulary that no
tile divides; the ticket counters left at 0 for the next launch. Under Triton's interpreter on
tiny rows (16-logit tiles); on a GPU also the Qwen3-30B-A3B vocabulary in bf16."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.ops.argmax_triton import argmax_rows_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
VOCABS = [1, 37, 64] + ([151936] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", VOCABS)
def test_argmax_matches_torch_on_random_rows_with_ties(V, dtype):
    torch.manual_seed(V)
    # Few distinct values: most rows hold their maximum more than once, in several tiles.
    x = torch.randint(-3, 4, (5, V), device=DEVICE).to(dtype)
    tickets = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    assert torch.equal(argmax_rows_triton(x, tickets), x.argmax(dim=-1))
    assert not tickets.any()  # left at 0: the next launch (a replayed graph) counts from 0
    y = torch.randn(5, V, device=DEVICE).to(dtype)
    assert torch.equal(argmax_rows_triton(y, tickets), y.argmax(dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_wins_and_all_minus_inf_gives_the_first_index(dtype):
    V = 50
    x = torch.randn(4, V, device=DEVICE).to(dtype)
    x[0, 33] = float("nan")
    x[0, 40] = float("nan")  # the first NaN wins
    x[1, 5] = float("inf")
    x[1, 45] = float("nan")  # NaN above +inf
    x[2] = float("-inf")
    x[3, 17] = float("inf")
    x[3, 48] = float("inf")  # tie at +inf across tiles: the lower index
    got = argmax_rows_triton(x)
    assert got.tolist() == [33, 45, 0, 17]
    assert torch.equal(got, x.argmax(dim=-1))


def test_strided_rows_and_an_empty_batch():
    x = torch.randn(3, 80, device=DEVICE)[:, :70]
    assert torch.equal(argmax_rows_triton(x), x.argmax(dim=-1))
    assert argmax_rows_triton(torch.empty(0, 9, device=DEVICE)).shape == (0,)


def test_refuses_what_it_cannot_reduce_in_one_line():
    with pytest.raises(ValueError, match=r"argmax_rows: logits must be \[B, V\]"):
        argmax_rows_triton(torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="floating point"):
        argmax_rows_triton(torch.ones(2, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="tickets must be int32 zeros, at least 2"):
        argmax_rows_triton(torch.randn(2, 3, device=DEVICE),
                           torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_writes_into_a_given_buffer_and_refuses_one_it_cannot_fill():
    """`out` (the engine's next-token buffer): the ids land in that memory, the rest of the
    buffer untouched; a buffer of the wrong size, dtype or layout is refused."""
    x = torch.randn(3, 70, device=DEVICE)
    buffer = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    got = argmax_rows_triton(x, out=buffer[1:4])
    assert got.data_ptr() == buffer[1:4].data_ptr()
    assert torch.equal(buffer[1:4], x.argmax(dim=-1)) and buffer[0] == buffer[4] == -1
    for bad in (torch.empty(4, dtype=torch.int64, device=DEVICE),
                torch.empty(3, dtype=torch.int32, device=DEVICE),
                torch.empty(6, dtype=torch.int64, device=DEVICE)[::2]):
        with pytest.raises(ValueError, match=r"out must be a contiguous \[3\] int64 tensor"):
            argmax_rows_triton(x, out=bad)
