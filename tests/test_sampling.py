"""sample_tokens against the distribution it claims: temperature, top-k and top-p each checked on
a row whose probabilities are known, over many draws (one row per position, so each row is a
draw of its own), with bounds derived from the binomial spread of the counts; greedy and tiny
temperatures against the argmax; the counter-based noise's marginal and the independence of
draws at neighbouring positions and seeds; a row's token the same alone and in any batch."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.infer.sampling import (SamplingParams, draw_key, gumbel_noise, gumbel_of_hash,
                                    ranked_candidates, sample_tokens)

DRAWS = 20000


def _draw(logits_BV: torch.Tensor, params: SamplingParams | list[SamplingParams], seed: int = 0,
          positions: list[int] | None = None) -> torch.Tensor:
    B = logits_BV.shape[0]
    params = params if isinstance(params, list) else [params] * B
    positions = list(range(B)) if positions is None else positions
    return sample_tokens(logits_BV, params, [seed] * B, positions)


def _frequencies(logits_V: torch.Tensor, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    """The share of DRAWS draws (positions 0 .. DRAWS - 1 of one seed) that picked each token."""
    ids = _draw(logits_V.expand(DRAWS, -1), params, seed)
    return torch.bincount(ids, minlength=logits_V.numel()).double() / DRAWS


def _assert_close_to(freq: torch.Tensor, expected: torch.Tensor) -> None:
    """Each frequency within 5 binomial standard deviations of its probability (and tokens of
    probability 0 never drawn)."""
    expected = expected.double()
    assert torch.all(freq[expected == 0] == 0), (freq, expected)
    sd = (expected * (1 - expected) / DRAWS).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sd + 1e-12), (freq, expected)


LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.4, 1.1, -2.0, 0.7, 0.0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_temperature_samples_softmax_of_the_scaled_logits(temperature):
    freq = _frequencies(LOGITS, SamplingParams(temperature=temperature))
    _assert_close_to(freq, (LOGITS / temperature).softmax(-1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_renormalises_over_the_k_best(k):
    freq = _frequencies(LOGITS, SamplingParams(temperature=1.0, top_k=k))
    kept = LOGITS.topk(k).indices
    expected = torch.zeros_like(LOGITS)
    expected[kept] = LOGITS[kept].softmax(-1)
    _assert_close_to(freq, expected)


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.55, 2), (0.85, 3), (0.96, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    freq = _frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=top_p))
    order = probs.argsort(descending=True)[:kept]
    expected = torch.zeros_like(probs)
    expected[order] = probs[order] / probs[order].sum()
    _assert_close_to(freq, expected)


def test_greedy_and_tiny_temperatures_take_the_argmax_of_every_row():
    torch.manual_seed(0)
    logits_BV = torch.randn(6, 300) * 4
    argmax = logits_BV.argmax(-1)
    assert torch.equal(_draw(logits_BV, SamplingParams(temperature=0)), argmax)
    # Below float32's range a temperature used to overflow the logits (every probability NaN).
    for t in (1e-3, 1e-30, 1e-45, 5e-324):
        assert torch.equal(_draw(logits_BV, SamplingParams(temperature=t), seed=1), argmax), t


def test_a_tiny_temperature_samples_among_tied_maxima_only():
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.999])
    freq = _frequencies(logits, SamplingParams(temperature=1e-40))
    _assert_close_to(freq, torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))


def test_greedy_and_sampled_rows_in_one_call():
    torch.manual_seed(1)
    logits_BV = torch.randn(5, 40)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=5.0),
              SamplingParams(temperature=0), SamplingParams(temperature=5.0, top_k=3),
              SamplingParams(temperature=0)]
    got = _draw(logits_BV, params, positions=[0] * 5)
    assert got[[0, 2, 4]].tolist() == logits_BV[[0, 2, 4]].argmax(-1).tolist()
    # the sampled rows are the ones they are alone
    for i in (1, 3):
        assert got[i] == _draw(logits_BV[i:i + 1], params[i], positions=[0])[0]


def test_the_same_seed_and_position_draw_the_same_token_and_others_others():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    assert torch.equal(_draw(logits, params, seed=7), _draw(logits, params, seed=7))
    assert not torch.equal(_draw(logits, params, seed=7), _draw(logits, params, seed=8))
    shifted = list(range(1, 65))
    assert not torch.equal(_draw(logits, params, seed=7),
                           _draw(logits, params, seed=7, positions=shifted))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9),  # temperature only: the whole row
    SamplingParams(temperature=0.9, top_k=7, top_p=0.8),  # top-k candidates
    SamplingParams(temperature=0.9, top_p=0.8),  # a full sort
])
def test_a_rows_token_does_not_depend_on_its_batch_mates(params):
    """Batch-mates decide how candidates are found (their k, whether one needs a sort): each
    row's token is the one it draws alone."""
    torch.manual_seed(2)
    logits = torch.randn(24, 300) * 2
    mates = [SamplingParams(temperature=0.5, top_k=40), SamplingParams(temperature=1.3, top_p=0.5),
             SamplingParams(temperature=0), SamplingParams(temperature=2.0)]
    batch = [params if i % 2 == 0 else mates[(i // 2) % 4] for i in range(24)]
    seeds = [100 + i for i in range(24)]
    got = sample_tokens(logits, batch, seeds, list(range(24)))
    for i in range(0, 24, 2):
        alone = sample_tokens(logits[i:i + 1], [params], [seeds[i]], [i])
        assert got[i] == alone[0], i


def test_a_nucleus_mass_is_its_whole_rows_sum():
    """row_mass: exp((logit - max) / temperature) summed over the whole row (NaN as 0: a row
    with a NaN or tied infinite maxima draws among those), what a row without a top-k measures
    its nucleus against."""
    from moeflow.infer.sampling import row_mass

    torch.manual_seed(10)
    logits = torch.randn(5, 64) * 3
    logits[1, 7] = float("nan")
    logits[2, :] = float("-inf")
    logits[3, [4, 40]] = float("inf")
    table = torch.tensor([[t, 0, 0.9, 0, 0, r] for t, r in
                          [(0.7, 0), (1.0, 1), (1.0, 2), (1.0, 3), (1.5, 4)]], dtype=torch.float64)
    got = row_mass(logits.bfloat16(), table)[:, 0].double()
    x = logits.bfloat16().double()
    want = ((x[[0, 4]] - x[[0, 4]].amax(-1, keepdim=True)) / torch.tensor([[0.7], [1.5]])).exp()
    assert torch.allclose(got[[0, 4]], want.sum(-1), rtol=1e-6)
    assert got[1:4].tolist() == [64.0, 64.0, 2.0]


@pytest.mark.parametrize("first", [8, 32])
def test_the_cpus_best_candidates_first_draw_what_the_sort_draws(monkeypatch, first):
    """On the CPU a batch of nucleus and top-k rows takes each row's best `first` candidates,
    then 4 times more while a nucleus runs past them, before a sort of every logit
    (CPU_FIRST_CANDIDATES): the tokens are the sort's, row by row, for flat and peaked rows,
    ties, NaN and infinite logits, alone or beside rows that need the sort."""
    from moeflow.infer import sampling

    torch.manual_seed(9)
    V = 300
    logits = torch.randn(12, V) * torch.tensor([0.3, 1.0, 4.0, 12.0]).repeat(3)[:, None]
    logits[4] = (logits[4] * 2).round() / 2  # ties at most values
    logits[5, 17] = float("nan")
    logits[6, :] = float("-inf")
    logits[7, [3, 9]] = float("inf")
    logits = logits.bfloat16()
    rows = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
            [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 0, 0.99), (0.8, 20, 0.9), (1.0, 0, 0.3),
             (0.9, 0, 0.95), (1.0, 0, 0.8), (1.0, 0, 0.7), (1.0, 5, 1.0), (0.5, 0, 0.999),
             (2.0, 0, 0.6), (1.0, 0, 0.9)]]
    seeds, positions = list(range(40, 52)), list(range(12))
    calls, drawn = [], []
    ranked, draw_reference = sampling.ranked_candidates, sampling.draw_reference
    monkeypatch.setattr(sampling, "ranked_candidates",
                        lambda x, k, *a: calls.append(k) or ranked(x, k, *a))
    monkeypatch.setattr(sampling, "draw_reference", lambda *a, **kw: drawn.append(
        (kw.get("whole", True), draw_reference(*a, **kw))) or drawn[-1][1])
    peaked = [3, 7, 10, 11]  # nuclei of a few tokens
    for draw in range(20):
        pos = [q + 100 * draw for q in positions]
        for batch in (list(range(12)), peaked):
            args = (logits[batch], [rows[i] for i in batch], [seeds[i] for i in batch],
                    [pos[i] for i in batch])
            monkeypatch.setattr(sampling, "CPU_FIRST_CANDIDATES", V)  # no shortcut: the sort
            want = sample_tokens(*args)
            monkeypatch.setattr(sampling, "CPU_FIRST_CANDIDATES", first)
            assert torch.equal(sample_tokens(*args), want)
        with_mate = sample_tokens(torch.cat([logits, logits[:1]]),
                                  rows + [SamplingParams(temperature=1.0)], seeds + [1],
                                  pos + [0])  # a row with neither filter: the sort
        assert torch.equal(with_mate[:12], sample_tokens(logits, rows, seeds, pos))
    n = max(first, 20)  # the top-k row's k at least
    assert n in calls and 4 * n in calls and None in calls  # first, 4 times more, the sort
    outcomes = {(whole, got is None) for whole, got in drawn}
    assert outcomes == {(True, False), (False, False), (False, True)}  # each way taken


@pytest.mark.parametrize("k", [None, 1, 7, 40, 300])
def test_candidates_rank_by_value_then_lower_id(k):
    """bf16 logits full of ties, with infinities: a stable sort (all) or a top-k with its tie
    group refilled (k) gives Python's sort by (-value, id), its first k."""
    torch.manual_seed(3)
    x = (torch.randn(4, 500) * 2).round().bfloat16()
    x[0, [5, 9]] = float("inf")
    x[1, [2, 4]] = float("-inf")
    x[3] = 0.0  # one tie group holding the whole row
    values, ids = ranked_candidates(x, k)
    for row, got_ids, got_values in zip(x.float().tolist(), ids.tolist(), values.float().tolist()):
        want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        assert got_ids == want and got_values == [row[i] for i in want]


@pytest.mark.parametrize("mate", [SamplingParams(temperature=0.7, top_k=50),
                                  SamplingParams(temperature=0.7, top_p=0.9),
                                  SamplingParams(temperature=0.7)])
def test_top_k_rows_with_tied_logits_do_not_depend_on_their_batch_mates(mate):
    """bf16 logits rounded to halves, so that tokens tie at the k-th value: a top-k row draws
    the same tokens alone (candidates from a top-k of its own k) as beside a row that needs more
    candidates or a full sort (a tie order left to torch.topk changed ~8% of them)."""
    torch.manual_seed(4)
    row = (torch.randn(1, 2000) * 3).mul(2).round().div(2).bfloat16()
    kth = row.float().topk(6).values[0, -1]
    assert (row.float() == kth).sum() >= 2  # a tie at the 6th value
    params = SamplingParams(temperature=1.0, top_k=6)
    n = 400
    alone = sample_tokens(row.expand(n, -1), [params] * n, [1] * n, list(range(n)))
    both = sample_tokens(torch.cat([row.expand(n, -1), row.expand(n, -1)]),
                         [params] * n + [mate] * n, [1] * (2 * n), list(range(n)) * 2)
    assert torch.equal(both[:n], alone)


def test_top_p_stops_at_the_first_token_that_reaches_p():
    """Four equal tokens, p = 0.5: the first two in rank order (the lower ids) reach it; a
    third is not kept (a <= in the rule would keep it)."""
    freq = _frequencies(torch.zeros(4), SamplingParams(temperature=1.0, top_p=0.5))
    _assert_close_to(freq, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_a_huge_temperature_never_draws_a_masked_token_and_nan_rows_still_draw():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")])
    for params in (SamplingParams(temperature=1e39), SamplingParams(temperature=1e39, top_k=3)):
        assert set(_draw(logits.expand(400, -1), params).tolist()) == {0, 2}
    for row in (torch.full((1, 10), float("nan")), torch.full((1, 10), float("-inf"))):
        got = sample_tokens(row, [SamplingParams(top_p=0.9)], [1], [0])
        assert 0 <= got.item() < 10


def test_the_noise_uses_the_whole_key():
    ids = torch.arange(1000)
    lo, hi = draw_key(5, 5)
    g = gumbel_noise(ids, torch.tensor(lo), torch.tensor(hi))
    assert not torch.equal(g, gumbel_noise(ids, torch.tensor(lo), torch.tensor(hi ^ 1)))
    assert not torch.equal(g, gumbel_noise(ids, torch.tensor(lo ^ 1), torch.tensor(hi)))


@pytest.mark.parametrize("block", [7, 300, 1 << 17])  # blocks of a row; two rows; all
def test_the_cpus_noise_in_blocks_is_the_noise(monkeypatch, block):
    """draw_reference adds the noise on the CPU in blocks (cache-sized): each row's own key,
    every element once, the same bits as the whole block's noise."""
    from moeflow.infer import sampling

    monkeypatch.setattr(sampling, "CPU_NOISE_BLOCK", block)
    S, N = 5, 150
    x = torch.randn(S, N, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 2**32, (S, N), generator=torch.Generator().manual_seed(3))
    keys = [draw_key(7, p) for p in range(S)]
    lo, hi = (torch.tensor([[k[i]] for k in keys]) for i in (0, 1))
    want = x + gumbel_noise(ids, lo, hi)
    got = sampling._add_noise(x.clone(), ids, lo, hi)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_the_noise_is_gumbel_distributed():
    """The CDF of the noise of 200,000 token ids under one key, at nine points, against
    exp(-exp(-g)) within 5 binomial standard deviations."""
    n = 200_000
    lo, hi = draw_key(3, 11)
    g = gumbel_noise(torch.arange(n), torch.tensor(lo), torch.tensor(hi)).double()
    assert torch.isfinite(g).all()
    for q in (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0):
        cdf = math.exp(-math.exp(-q))
        sd = math.sqrt(cdf * (1 - cdf) / n)
        assert abs((g <= q).double().mean().item() - cdf) <= 5 * sd, q


def test_the_noise_is_finite_and_increasing_over_every_hash_including_the_ends():
    """u from the hash's extremes (and across the switch to the log1p form at u = 1/2) gives
    finite noise that grows with the hash, within the documented range; and matches
    -log(-log u) computed in float64."""
    edges = [0, 1, 2, 2 ** 24, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 32 - 2 ** 8,
             2 ** 32 - 3, 2 ** 32 - 2, 2 ** 32 - 1]
    h = torch.tensor(edges + torch.randint(0, 2 ** 32, (5000,)).sort().values.tolist())
    h = h.sort().values
    g = gumbel_of_hash(h)
    assert torch.isfinite(g).all() and g.min() > -3.2 and g.max() < 22.9
    assert (g[1:] >= g[:-1]).all()
    u = (h.double() + 0.5) * 2.0 ** -32
    w = (2.0 ** 32 - h.double() - 0.5) * 2.0 ** -32  # 1 - u, exact in float64
    exact = -torch.log(torch.where(u < 0.5, -torch.log(u), -torch.log1p(-w)))
    assert torch.allclose(g.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neighbour", ["position", "seed"])
def test_draws_at_neighbouring_positions_and_seeds_are_independent(neighbour):
    """Two equally likely tokens drawn at positions i and i + 1 (or with seeds s and s + 1, as
    the server numbers a request's choices): each of the four pairs a quarter of the time."""
    logits = torch.zeros(DRAWS + 1, 2)
    params = SamplingParams(temperature=1.0)
    if neighbour == "position":
        t = _draw(logits, params, seed=9)
        a, b = t[:-1], t[1:]
    else:
        rows, pos = logits[:DRAWS], list(range(DRAWS))
        a = sample_tokens(rows, [params] * DRAWS, list(range(9, 9 + DRAWS)), pos)
        b = sample_tokens(rows, [params] * DRAWS, list(range(10, 10 + DRAWS)), pos)
    pairs = torch.bincount(a * 2 + b, minlength=4).double() / DRAWS
    _assert_close_to(pairs, torch.full((4,), 0.25))


def test_refuses_mismatched_rows_in_one_line():
    with pytest.raises(ValueError, match="3 rows of logits need as many params, seeds and "
                                         "positions, got 2, 3, 3"):
        sample_tokens(torch.randn(3, 5), [SamplingParams()] * 2, [0] * 3, [0] * 3)


def test_bounds_of_the_frequency_check_are_tight_enough_to_fail():
    # The check must reject a distribution that differs by a few percent (the size of error a
    # wrong temperature or filter would make): 0.5 / 0.5 against 0.45 / 0.55.
    freq = torch.tensor([0.5, 0.5], dtype=torch.float64)
    sd = math.sqrt(0.45 * 0.55 / DRAWS)
    assert 0.05 > 5 * sd
    with pytest.raises(AssertionError):
        _assert_close_to(freq, torch.tensor([0.45, 0.55]))
