"""Router semantics on hand-computed cases."""

import math

import pytest
import torch

from moeflow import RouterConfig
from moeflow.model.router import Router


def route(logits_TE, training=False, generator=None, **cfg):
    """Route tokens whose router logits are exactly `logits_TE` (x = I, gate = logitsᵀ)."""
    logits_TE = torch.as_tensor(logits_TE, dtype=torch.float32)
    T, E = logits_TE.shape
    router = Router(T, E, RouterConfig(**{"min_capacity": 0, **cfg}))
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.t())
    router.train(training)
    return router(torch.eye(T), generator=generator), router


def test_position_priority_keeps_the_first_tokens():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 10.0  # every token wants expert 0
    r, _ = route(logits)
    assert r.capacity == 2  # ceil(1 * 8 / 4 * 1.0)
    assert r.kept_TK[:, 0].tolist() == [True, True] + [False] * 6
    assert r.counts_E.tolist() == [2, 0, 0, 0]  # counted after dropping
    assert int(r.num_dropped) == 6
    assert torch.all(r.weights_TK[2:] == 0) and torch.all(r.weights_TK[:2] > 0.99)


def test_top2_first_choices_have_priority_over_second_choices():
    # t0, t1 prefer e0 then e1; t2 prefers e1 then e0. capacity = ceil(2*3/2*0.6) = 2.
    logits = [[2.0, 1.0], [2.0, 1.0], [1.0, 2.0]]
    r, _ = route(logits, top_k=2, capacity_factor=0.6, eval_capacity_factor=0.6)
    assert r.capacity == 2
    assert r.ids_TK.tolist() == [[0, 1], [0, 1], [1, 0]]
    # e0 queue: t0(1st) t1(1st) t2(2nd); e1 queue: t2(1st) t0(2nd) t1(2nd)
    assert r.slots_TK.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert r.kept_TK.tolist() == [[True, True], [True, False], [True, False]]
    assert r.counts_E.tolist() == [2, 2]


def test_dropless_keeps_everything():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 10.0
    r, _ = route(logits, dropless=True)
    assert r.capacity is None and bool(r.kept_TK.all())
    assert r.counts_E.tolist() == [8, 0, 0, 0] and int(r.num_dropped) == 0


def test_random_token_selection_is_seeded():
    logits = torch.zeros(16, 4)
    logits[:, 0] = 10.0

    def kept(seed):
        torch.manual_seed(seed)
        r, _ = route(logits, training=True, drop_policy="random")
        assert int(r.kept_TK.sum()) == 4
        return r.kept_TK[:, 0].tolist()

    assert kept(0) == kept(0)
    assert kept(0) != kept(1)
    assert kept(0) != [True] * 4 + [False] * 12  # not position order
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, _ = route(logits, drop_policy="random", generator=g1)
    b, _ = route(logits, drop_policy="random", generator=g2)
    assert torch.equal(a.kept_TK, b.kept_TK)


def test_aux_and_z_loss_values():
    # probs = [0.25, 0.75] for both tokens; both pick e1: f = [0, 1], P = [0.25, 0.75]
    logits = [[0.0, math.log(3)], [0.0, math.log(3)]]
    r, _ = route(logits, aux_loss_coef=0.1, z_loss_coef=0.01, dropless=True)
    assert r.aux_loss.item() == pytest.approx(2 * 0.75)
    assert r.z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert r.loss.item() == pytest.approx(0.1 * 1.5 + 0.01 * math.log(4) ** 2)
    assert r.weights_TK[:, 0].tolist() == pytest.approx([0.75, 0.75])


def test_balanced_routing_has_aux_loss_one():
    logits = torch.eye(4) * 5.0
    r, _ = route(logits)
    assert r.aux_loss.item() == pytest.approx(1.0)


def test_ties_go_to_the_lower_expert_index():
    r, _ = route(torch.zeros(3, 6), top_k=2, dropless=True)
    assert r.ids_TK.tolist() == [[0, 1]] * 3
    r, _ = route([[1.0, 3.0, 3.0, 3.0]], top_k=2, dropless=True)
    assert r.ids_TK.tolist() == [[1, 2]]


def test_nan_and_inf_logits_give_in_range_ids():
    nan, inf = float("nan"), float("inf")
    logits = [[nan] * 4, [inf, -inf, nan, 1.0], [-inf] * 4, [inf] * 4]
    for score_func in ("softmax", "sigmoid"):
        r, _ = route(logits, top_k=2, dropless=True, score_func=score_func)
        assert bool(((r.ids_TK >= 0) & (r.ids_TK < 4)).all())
        assert bool(torch.isfinite(r.weights_TK).all())
        assert r.ids_TK[1, 0].item() == 0


def test_sigmoid_scores_renormalised_and_scaled():
    torch.manual_seed(0)
    logits = torch.randn(5, 8)
    r, _ = route(logits, top_k=2, dropless=True, score_func="sigmoid", normalize_topk=True,
                 routed_scaling=2.5)
    assert torch.allclose(r.weights_TK.sum(-1), torch.full((5,), 2.5))
    r, _ = route(logits, top_k=2, dropless=True, score_func="sigmoid", normalize_topk=False)
    expected = logits.sigmoid().gather(1, r.ids_TK)
    assert torch.allclose(r.weights_TK, expected)


def test_expert_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    r, router = route(logits, dropless=True, expert_bias=True)
    assert r.ids_TK.item() == 0
    router.expert_bias[1] = 1.0
    r = router(torch.eye(1))
    assert r.ids_TK.item() == 1
    assert r.weights_TK.item() == pytest.approx(logits.softmax(-1)[0, 1].item())
    router.expert_bias.zero_()
    router.update_expert_bias(torch.tensor([10, 0, 2]))
    assert router.expert_bias[0] < 0 < router.expert_bias[1]


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limited_routing_stays_in_the_best_groups(group_score):
    # 2 groups of 2: e0 is the best expert, but group 1's pair has the larger sum (V3 picks
    # e2, the lower of two tied experts) while group 0 has the best single score (V2 picks e0).
    r, _ = route([[3.0, -5.0, 2.5, 2.5]], dropless=True, num_groups=2, topk_groups=1,
                 group_score=group_score)
    assert r.ids_TK.item() == (2 if group_score == "top2_sum" else 0)

    # Random logits against a per-token reference written from the definition.
    torch.manual_seed(0)
    T, E, G, K, per_group = 64, 16, 4, 3, 4
    logits = torch.randn(T, E) * 2
    r, _ = route(logits, top_k=K, dropless=True, num_groups=G, topk_groups=2,
                 group_score=group_score, normalize_topk=False)
    scores = logits.softmax(-1)
    expected = []
    for s in scores.tolist():
        ranked = [sorted(s[g * per_group:(g + 1) * per_group], reverse=True) for g in range(G)]
        value = [x[0] + x[1] if group_score == "top2_sum" else x[0] for x in ranked]
        groups = sorted(range(G), key=lambda g: -value[g])[:2]
        allowed = [e for e in range(E) if e // per_group in groups]
        expected.append(sorted(allowed, key=lambda e: -s[e])[:K])
    assert r.ids_TK.tolist() == expected
    torch.testing.assert_close(r.weights_TK, scores.gather(1, r.ids_TK))  # unmasked scores
    plain, _ = route(logits, top_k=K, dropless=True)
    assert not torch.equal(plain.ids_TK, r.ids_TK)  # the limit changed some tokens' experts


def test_noise_only_in_training():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    for noise in ("jitter", "rsample"):
        router = Router(16, 8, RouterConfig(dropless=True, noise=noise, noise_eps=0.5))
        router.eval()
        assert torch.equal(router(x).ids_TK, router(x).ids_TK)
        clean = router(x).ids_TK
        router.train()
        assert not torch.equal(router(x).ids_TK, clean)


def test_inference_routing_is_dropless_and_noise_free_in_either_mode():
    """`inference=True` is what the engine and a distillation teacher pass: whatever the
    module's training flag, no capacity and no noise; without it the same router drops."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    for noise in ("jitter", "rsample"):
        router = Router(16, 8, RouterConfig(top_k=2, capacity_factor=0.25,
                                            eval_capacity_factor=0.25, min_capacity=1,
                                            noise=noise, noise_eps=0.5))
        results = []
        for training in (True, True, False):
            router.train(training)
            r = router(x, inference=True)
            assert r.capacity is None and bool(r.kept_TK.all()) and int(r.num_dropped) == 0
            results.append(r)
            assert int(router(x).num_dropped) > 0  # the module's own routing drops
        for r in results[1:]:
            assert torch.equal(r.ids_TK, results[0].ids_TK)
            assert torch.equal(r.weights_TK, results[0].weights_TK)
        router.train()
        assert not torch.equal(router(x).ids_TK, results[0].ids_TK)  # training adds noise


def test_counts_and_slots_form_a_mapping_table():
    torch.manual_seed(0)
    r, _ = route(torch.randn(40, 8), top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5)
    ids, slots, kept = r.ids_TK, r.slots_TK, r.kept_TK
    for e in range(8):
        mine = slots[ids == e]
        assert sorted(mine.tolist()) == list(range(mine.numel()))  # a permutation of 0..n-1
        assert int(r.counts_E[e]) == int(((ids == e) & kept).sum()) == min(mine.numel(), r.capacity)
    assert int(r.num_dropped) == int((~kept).sum())


def test_logits_stay_fp32_under_autocast():
    # Two experts whose logits differ by less than bf16 resolves near 1.0 (2^-7): in fp32 the
    # second wins; computed in bf16 (what autocast does to a linear, even from fp32 operands)
    # they tie and the lower index would win.
    router = Router(1, 2, RouterConfig(top_k=1, dropless=True))
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0], [1.0 + 2**-10]]))
    x = torch.ones(1, 1)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
    assert plain.ids_TK.tolist() == [[1]]
    assert mixed.ids_TK.tolist() == [[1]]
    assert torch.equal(mixed.weights_TK, plain.weights_TK)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_half_precision_logits_equal_the_fp32_product(device):
    """router_logits of bf16 operands: on CUDA without autograd one bf16 GEMM with fp32 output
    (the products of bf16 numbers are exact in fp32, so only the summation order differs from
    the fp32 GEMM of the upcast operands); on the CPU and under autograd that fp32 GEMM."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from moeflow.model.router import router_logits
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 256, generator=g).to(device, torch.bfloat16)
    w = torch.randn(24, 256, generator=g).to(device, torch.bfloat16)
    want = x.float() @ w.float().t()
    with torch.no_grad():
        got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (2, 37, 24)
    # fp32 summation of 256 exact products: a few ulps of the sum of their magnitudes
    bound = 256 * torch.finfo(torch.float32).eps * (x.float().abs() @ w.float().abs().t())
    assert ((got - want).abs() <= bound).all()
    w.requires_grad_(True)
    logits = router_logits(x, w)
    logits.sum().backward()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(w.grad, x.float().sum((0, 1)).expand(24, -1).to(w.dtype),
                               rtol=2**-7, atol=1e-3)
