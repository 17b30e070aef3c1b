"""DeepSpeed-MoE's gating reproduced exactly: hand-computed cases, a capacity grid, and random
tables against the one-hot / cumsum formulation of GShard-style top-1 and top-2 gating.

The one-hot formulation below is written from the algorithm (first choice = arg-max probability,
second = arg-max logit among the others, queue position = running count of earlier assignments
to the expert with all first choices ahead of second choices, drop past capacity, renormalise
the surviving top-2 gates, balance loss from first choices); it is independent of moeflow's
sort-based router and of DeepSpeed's code.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeflow import RouterConfig
from moeflow.model.router import Router


def route(logits_TE, **cfg):
    """Route tokens whose router logits are exactly `logits_TE` (x = I, gate = logitsᵀ)."""
    logits_TE = torch.as_tensor(logits_TE, dtype=torch.float32)
    T, E = logits_TE.shape
    router = Router(T, E, RouterConfig(**{"min_capacity": 0, **cfg}))
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.t())
    router.eval()
    return router(torch.eye(T))


def route_dict(r) -> dict:
    """Per token: {expert: weight} over kept routes."""
    out = []
    for t in range(r.ids_TK.shape[0]):
        out.append({int(e): float(w) for e, w, k
                    in zip(r.ids_TK[t], r.weights_TK[t].detach(), r.kept_TK[t]) if k})
    return out


# ---- hand-computed cases ---------------------------------------------------------------------

def test_top2_balance_loss_counts_first_choices():
    # softmax([1.541, -0.2934]) = [0.86226, 0.13774]; first choices [1, 0]; l_aux = 2 · 0.86226.
    r = route([[1.541, -0.2934]], top_k=2, dropless=True)
    assert r.aux_loss.item() == pytest.approx(1.72452, abs=1e-4)
    # Averaging over both choices would give 1.0 for any E=2 logits.
    r_all = route([[1.541, -0.2934]], top_k=2, dropless=True, aux_loss_choices="all")
    assert r_all.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_top2_renormalises_over_the_routes_that_survived_capacity():
    # capacity = ceil(fp32(3/2) · fp32(0.6·2)) = 2. e0 queue: t0, t1 (first), t2 (second: slot 2,
    # dropped); e1 queue: t2 (first), t0 (second), t1 (second: slot 2, dropped).
    r = route([[2.0, 1.0], [2.0, 1.0], [1.0, 2.0]], top_k=2, capacity_factor=0.6,
              eval_capacity_factor=0.6)
    assert r.capacity == 2
    p = 1 / (1 + math.exp(-1.0))  # 0.731059
    got = route_dict(r)
    assert got[0] == pytest.approx({0: p, 1: 1 - p}, abs=1e-6)
    assert got[1] == {0: 1.0} and got[2] == {1: 1.0}


def test_second_choice_is_the_best_logit_when_probabilities_underflow():
    # exp(-150) and exp(-200) underflow to 0 in fp32: by probability experts 1 and 2 tie.
    r = route([[0.0, -200.0, -150.0]], top_k=2, dropless=True)
    assert r.ids_TK.tolist() == [[0, 2]]
    assert r.weights_TK.tolist() == [[1.0, 0.0]]


def test_top1_weight_is_the_raw_probability():
    r = route([[1.0, 0.0, -1.0], [0.0, 3.0, 0.0]], top_k=1, dropless=True)
    probs = torch.tensor([[1.0, 0.0, -1.0], [0.0, 3.0, 0.0]]).softmax(-1)
    assert r.ids_TK.tolist() == [[0], [1]]
    torch.testing.assert_close(r.weights_TK[:, 0], probs.max(-1).values)
    me = probs.mean(0)
    assert r.aux_loss.item() == pytest.approx(3 * (me[0] * 0.5 + me[1] * 0.5).item(), rel=1e-6)


@pytest.mark.parametrize("T, E, factor, k, expected", [
    (25, 2, 1.2, 1, 16),   # fp32(12.5) · fp32(1.2) = 15.0000010 -> 16 (in float64: 15)
    (10, 4, 0.9, 2, 5),    # fp32(2.5) · fp32(1.8) = 4.5000002 -> 5
    (7, 2, 1.1, 1, 4),     # 3.5 · 1.1 = 3.85 -> 4
    (3, 2, 0.6, 2, 2),
    (8, 4, 1.0, 1, 2),
])
def test_capacity_hand_values(T, E, factor, k, expected):
    cfg = RouterConfig(top_k=k, capacity_factor=factor, min_capacity=0)
    assert cfg.capacity(T, E, training=True) == expected


def _fp32_capacity(T: int, E: int, factor: float, k: int) -> int:
    """DeepSpeed's _capacity: the product of two fp32 tensors, computed by torch."""
    return int(torch.ceil(torch.tensor(T / E, dtype=torch.float32)
                          * torch.tensor(factor * k, dtype=torch.float32)).item())


def test_capacity_grid_matches_fp32_arithmetic():
    differs_from_float64 = 0
    for factor in np.round(np.arange(0.3, 2.0001, 0.05), 2):
        for T in (1, 3, 7, 16, 25, 33, 64, 100, 257, 1000, 4096):
            for E in (1, 2, 3, 8, 16, 64, 128):
                for k in (1, 2):
                    cfg = RouterConfig(top_k=k, capacity_factor=float(factor), min_capacity=4)
                    want = max(_fp32_capacity(T, E, float(factor), k), 4)
                    assert cfg.capacity(T, E, training=True) == min(want, T), (T, E, factor, k)
                    differs_from_float64 += want != max(math.ceil(k * T / E * factor), 4)
    assert differs_from_float64 > 0  # the grid does exercise the fp32/float64 difference


# ---- random tables against the one-hot formulation ---------------------------------------------

def gshard_gating(logits_TE: torch.Tensor, k: int, capacity: int | None):
    """(kept {expert: weight} per token, l_aux), by one-hot masks and cumulative sums."""
    T, E = logits_TE.shape
    gates = logits_TE.softmax(-1)
    first = F.one_hot(gates.argmax(-1), E)
    masks = [first]
    if k == 2:
        masks.append(F.one_hot(logits_TE.masked_fill(first.bool(), float("-inf")).argmax(-1), E))
    kept_masks, ahead = [], torch.zeros(1, E, dtype=torch.int64)
    for mask in masks:
        location = torch.cumsum(mask, 0) - 1 + ahead
        ahead = ahead + mask.sum(0, keepdim=True)
        kept_masks.append(mask * (location < capacity) if capacity is not None else mask)
    g = [(gates * m).sum(-1) for m in kept_masks]
    if k == 2:
        denom = (g[0] + g[1]).clamp_min(torch.finfo(torch.float32).eps)
        g = [x / denom for x in g]
    routes = []
    for t in range(T):
        routes.append({int(m[t].argmax()): float(w[t]) for m, w in zip(kept_masks, g)
                       if m[t].any()})
    l_aux = E * (gates.mean(0) * first.float().mean(0)).sum()
    return routes, float(l_aux)


@pytest.mark.parametrize("k", [1, 2])
def test_random_tables_match_the_one_hot_formulation(k):
    g = torch.Generator().manual_seed(1234 + k)
    mismatching_aux = []
    for case in range(60):
        T = int(torch.randint(1, 40, (1,), generator=g))
        E = int(torch.randint(2, 9, (1,), generator=g))
        factor = float(torch.empty(1).uniform_(0.3, 2.0, generator=g))
        scale = float(torch.tensor([0.5, 3.0, 40.0])[case % 3])
        logits = torch.randn(T, E, generator=g) * scale
        if case % 5 == 0:  # ties in probability that the logits still order
            logits[:, 1:] = logits[:, 1:] - 300.0
        cfg = dict(top_k=k, capacity_factor=factor, eval_capacity_factor=factor)
        r = route(logits, **cfg)
        capacity = RouterConfig(top_k=k, eval_capacity_factor=factor, min_capacity=0).capacity(
            T, E, training=False)
        want, l_aux = gshard_gating(logits, k, capacity)
        got = route_dict(r)
        for t in range(T):
            assert got[t].keys() == want[t].keys(), (case, t)
            for e in want[t]:
                assert got[t][e] == pytest.approx(want[t][e], rel=1e-6, abs=1e-7), (case, t)
        if abs(r.aux_loss.item() - l_aux) > 1e-5 * max(1.0, l_aux):
            mismatching_aux.append(case)
    assert not mismatching_aux


def test_rsample_second_samples_only_the_second_choice_in_training():
    torch.manual_seed(0)
    router = Router(16, 8, RouterConfig(top_k=2, dropless=True, noise="rsample_second"))
    x = torch.randn(512, 16)
    router.eval()
    clean = router(x).ids_TK
    assert torch.equal(router(x).ids_TK, clean)  # deterministic in eval
    router.train()
    noisy = router(x, generator=torch.Generator().manual_seed(1)).ids_TK
    assert torch.equal(noisy[:, 0], clean[:, 0])
    assert (noisy[:, 1] != clean[:, 1]).float().mean() > 0.2
