"""sample_next against the distribution it claims: temperature, top-k and top-p each checked on
a row whose probabilities are known, over many seeded draws, with bounds derived from the
binomial spread of the counts; greedy and tiny temperatures against the argmax."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.infer.sampling import SamplingParams, sample_next

DRAWS = 20000


def _frequencies(logits_V: torch.Tensor, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    """The share of DRAWS seeded draws that picked each token (one row, drawn DRAWS times)."""
    generator = torch.Generator().manual_seed(seed)
    rows = logits_V.expand(DRAWS, -1)
    ids = sample_next(rows, params, generator)
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
    assert torch.equal(sample_next(logits_BV, SamplingParams(temperature=0)), argmax)
    # Below float32's range a temperature used to overflow the logits (every probability NaN).
    for t in (1e-3, 1e-30, 1e-45, 5e-324):
        got = sample_next(logits_BV, SamplingParams(temperature=t),
                          torch.Generator().manual_seed(1))
        assert torch.equal(got, argmax), t


def test_a_tiny_temperature_samples_among_tied_maxima_only():
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.999])
    freq = _frequencies(logits, SamplingParams(temperature=1e-40))
    _assert_close_to(freq, torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next(logits, params, g) for _ in range(16)])

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_bounds_of_the_frequency_check_are_tight_enough_to_fail():
    # The check must reject a distribution that differs by a few percent (the size of error a
    # wrong temperature or filter would make): 0.5 / 0.5 against 0.45 / 0.55.
    freq = torch.tensor([0.5, 0.5], dtype=torch.float64)
    sd = math.sqrt(0.45 * 0.55 / DRAWS)
    assert 0.05 > 5 * sd
    with pytest.raises(AssertionError):
        _assert_close_to(freq, torch.tensor([0.45, 0.55]))
