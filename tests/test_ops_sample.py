"""The sampled rows' one-launch draw (moeflow.ops.sample_triton) against its plain-torch reference
(moeflow.infer.sampling.draw_reference), token for token: the three ways candidates come (the
whole row, in tiles reduced by the last to arrive; a top-k; a full sort), fp32 and bf16, rows
of mixed temperature / k / p (k past the candidates, p = 1 beside p < 1, a tiny temperature), a
table naming only some rows (the others keep their greedy tokens), several tiles per row, NaN
rows. Under Triton's interpreter on tiny rows
(16-candidate tiles); on a GPU also the Qwen3-30B-A3B vocabulary through sample_tokens."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.infer import sampling  # noqa: E402
from moeflow.infer.sampling import (SamplingParams, draw_key, draw_reference,  # noqa: E402
                                    sample_tokens)
from moeflow.ops.sample_triton import draw_triton  # noqa: E402

# (temperature, top_k, top_p) per row: every row differs from the next
ROWS = [(0.8, 5, 0.9), (1.0, 0, 0.7), (1e-30, 12, 1.0), (1.7, 40, 0.95), (0.6, 200, 0.5),
        (2.5, 1, 1.0), (1.0, 0, 1.0)]


def _table(rows: list[int], seed: int = 3) -> torch.Tensor:
    return torch.tensor([(*ROWS[r % len(ROWS)], *draw_key(seed + r, 17 + r), r) for r in rows],
                        dtype=torch.float64, device=DEVICE)


def _both(values, ids, table, ranked, top_p):
    B = values.shape[0]
    filler = torch.arange(100, 100 + B, device=DEVICE)
    ref = draw_reference(values, ids, table, filler.clone(), ranked=ranked, top_p=top_p)
    tickets = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    got = draw_triton(values, ids, table, filler.clone(), ranked=ranked, top_p=top_p,
                      argmax_B=values.argmax(dim=-1), tickets=tickets)
    assert not tickets.any()  # left at 0 for the next launch
    return ref, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["whole", "top-k", "sort"])
@pytest.mark.parametrize("V", [37, 100])
def test_the_kernel_draws_the_references_tokens(how, V, dtype):
    torch.manual_seed(V)
    B = 7
    logits = (torch.randn(B, V, device=DEVICE) * 3).to(dtype)
    if how == "whole":
        values, ids, ranked = logits, None, False
    elif how == "top-k":
        values, ids = logits.topk(min(V, 24), dim=-1)
        ranked = True
    else:
        values, ids = logits.sort(dim=-1, descending=True)
        ranked = True
    for seed in range(4):
        table = _table(list(range(B)), seed)
        ref, got = _both(values.contiguous(), ids, table, ranked, top_p=how != "whole")
        assert torch.equal(got, ref), (seed, got, ref)


def test_the_kernels_top_p_stops_at_the_first_candidate_that_reaches_p():
    """Four equal candidates, p = 0.5: only the first two are ever drawn."""
    values = torch.zeros(1, 4, device=DEVICE)
    ids = torch.arange(4, device=DEVICE)[None]
    drawn = set()
    for seed in range(40):
        table = _table([0], seed)
        table[0, :3] = torch.tensor([1.0, 0, 0.5], dtype=torch.float64)
        ref, got = _both(values, ids, table, ranked=True, top_p=True)
        assert torch.equal(got, ref)
        drawn.add(got.item())
    assert drawn == {0, 1}


def test_rows_outside_the_table_keep_their_tokens_and_the_table_may_skip_and_reorder():
    torch.manual_seed(0)
    logits = torch.randn(6, 50, device=DEVICE)
    values, ids = logits.sort(dim=-1, descending=True)
    table = _table([4, 1, 3])
    ref, got = _both(values, ids, table, ranked=True, top_p=True)
    assert torch.equal(got, ref)
    assert got[[0, 2, 5]].tolist() == [100, 102, 105]
    assert got[4] != 104 and 0 <= got[4] < 50


# numpy's warnings under the interpreter: inf - inf, NaN maxima
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("how", ["whole", "sort"])
def test_infinite_and_nan_logits_draw_the_references_token_inside_the_vocabulary(how):
    """x is 0 where (value - best) is NaN: +inf logits tie as the maximum (one of them is
    drawn), a row of -inf or with a NaN draws among all its tokens; never an id outside."""
    V = 40
    values = torch.randn(5, V, device=DEVICE)
    values[0, 7] = float("inf")
    values[1, [3, 30]] = float("inf")
    values[2] = float("-inf")
    values[3, 7] = float("nan")
    values[4] = float("nan")
    for seed in range(6):
        table = _table([0, 1, 2, 3, 4], seed)
        table[:, 2] = 0.9  # top-p on the sorted rows
        if how == "whole":
            ref, got = _both(values, None, table, ranked=False, top_p=False)
        else:
            ranked, ids = values.sort(dim=-1, descending=True)
            ref, got = _both(ranked, ids, table, ranked=True, top_p=True)
        assert torch.equal(got, ref), (seed, got, ref)
        assert ((0 <= got) & (got < V)).all() and got[0] == 7 and got[1] in (3, 30)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # / 1.2e-38
def test_whole_rows_in_a_reordered_table_take_their_own_rows_maximum():
    """A table naming rows out of order: each program reads its row's argmax (a tiny
    temperature makes the draw that argmax)."""
    values = torch.randn(4, 50, device=DEVICE) * 100
    table = _table([2, 0, 3])
    table[:, 0] = 1.2e-38
    ref, got = _both(values, None, table, ranked=False, top_p=False)
    argmax = values.argmax(dim=-1)
    assert torch.equal(got, ref) and got[[2, 0, 3]].tolist() == argmax[[2, 0, 3]].tolist()


def test_an_empty_table_changes_nothing_and_bad_tables_are_named():
    values = torch.randn(3, 10, device=DEVICE)
    out = torch.arange(3, device=DEVICE)
    empty = torch.empty(0, 6, dtype=torch.float64, device=DEVICE)
    assert draw_triton(values, None, empty, out, ranked=False, top_p=False).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"table must be float64 \[S, 6\]"):
        draw_triton(values, None, empty.float(), out, ranked=False, top_p=False)
    with pytest.raises(ValueError, match=r"whole rows need their argmax"):
        draw_triton(values, None, _table([0]), out, ranked=False, top_p=False)
    with pytest.raises(ValueError, match="ranked candidates need their token ids"):
        draw_triton(values, None, _table([0]), out, ranked=True, top_p=False)
    with pytest.raises(ValueError, match="candidate ids must match"):
        draw_triton(values, torch.zeros(3, 9, dtype=torch.int64, device=DEVICE), _table([0]), out,
                    ranked=True, top_p=False)


@pytest.mark.skipif(not ON_GPU, reason="the full vocabulary needs a GPU (interpreter: minutes)")
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95),
    SamplingParams(temperature=0.8, top_p=0.95),
    "mixed",
])
def test_sample_tokens_on_the_gpu_matches_the_reference_at_qwen3s_vocabulary(params,
                                                                             monkeypatch):
    torch.manual_seed(1)
    B, V = 16, 151936
    logits = (torch.randn(B, V, device=DEVICE) * 4).bfloat16()
    if params == "mixed":  # greedy, top-k, top-p alone, temperature alone, both, in turn
        kinds = [dict(temperature=0), dict(temperature=0.9, top_k=50),
                 dict(temperature=0.7, top_p=0.9), dict(temperature=1.2),
                 dict(temperature=0.8, top_k=40, top_p=0.95)]
        rows = [SamplingParams(**kinds[b % len(kinds)]) for b in range(B)]
    else:
        rows = [params] * B
    got = sample_tokens(logits, rows, list(range(B)), [50] * B)
    # the same candidates (the same device's top-k or sort), drawn by the reference
    monkeypatch.setattr(sampling, "triton_available", lambda: False)
    assert torch.equal(got, sample_tokens(logits, rows, list(range(B)), [50] * B))
