"""The one-launch decode routers (moeflow.ops.decode_route_triton, "triton_decode", and
moeflow.ops.decode_route_fused_triton, "triton_decode_fused") for routers with a capacity
(DeepSpeed-MoE's gating evaluated with eval_capacity_factor): each expert keeps its first
`capacity` assignments in priority order (first choices before second choices, then token
order); the RoutingResult equals route_reference's field for field and the plan
sort_by_expert's row for row, dropped assignments parked after the kept rows; a layer through
the decode path equals the reference layer, dropped tokens included; the Router takes the
kernels where they reproduce the reference's drops and not where they cannot (Random Token
Selection, Gumbel noise, statistics summed over ranks, autograd, expert groups)."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.config import RouterConfig  # noqa: E402
from moeflow.model.dispatch import LocalDispatcher, sort_by_expert  # noqa: E402
from moeflow.model.router import Router, route_reference, router_logits  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops.decode_route_fused_triton import route_decode_fused, route_tickets  # noqa: E402
from moeflow.ops.decode_route_triton import route_decode_triton  # noqa: E402
from moeflow.ops.routing_triton import route_triton  # noqa: E402
from tests.test_ops_decode_route import SortedRowsOnly  # noqa: E402
from tests.test_ops_decode_route_fused import _layer  # noqa: E402

CONFIGS = {
    # DeepSpeed-MoE's top-1: raw probabilities; min_capacity 1, so the capacity is ⌈T/E⌉.
    "top1": RouterConfig(top_k=1, min_capacity=1),
    # The eval factor gives ⌈T/(2E)⌉ slots, min_capacity raises them to 3.
    "top1_min_capacity": RouterConfig(top_k=1, eval_capacity_factor=0.5, min_capacity=3,
                                      z_loss_coef=1e-3),
    # DeepSpeed's top-2: the kept weights renormalised, balance loss on first choices.
    "top2": RouterConfig(top_k=2, min_capacity=1),
    # Sigmoid scores + bias within the best groups, renormalised then scaled; K = 3 pads the
    # kernel's choice tiles to 4.
    "top3_sigmoid_groups": RouterConfig(top_k=3, score_func="sigmoid", normalize_topk=True,
                                        routed_scaling=2.5, num_groups=4, topk_groups=2,
                                        expert_bias=True, min_capacity=1,
                                        eval_capacity_factor=1.5),
}
# (config, T, E, whether assignments are dropped): every config drops somewhere; one token
# never overflows an expert, and at (37, 128) min_capacity leaves room for every assignment.
# (37, 128): several blocks of tokens and of assignments in the one program.
CASES = [("top1", 1, 16, False), ("top1", 16, 16, True), ("top1", 37, 128, True),
         ("top1_min_capacity", 16, 16, True), ("top1_min_capacity", 37, 128, False),
         ("top2", 4, 16, True), ("top2", 16, 16, True), ("top2", 37, 128, True),
         ("top3_sigmoid_groups", 4, 16, False), ("top3_sigmoid_groups", 16, 16, True),
         ("top3_sigmoid_groups", 37, 128, True)]
FIELDS = ("ids_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped")
LOSSES = ("aux_loss", "z_loss", "loss")


def _logits(T, E, seed):
    """Crowded experts 0-2 (so capacity drops), ties, and a token whose scores all tie."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    logits[:, :3] += 2
    logits[:, E // 2] = logits[:, 1]
    if T > 2:
        logits[1] = 0.5
        logits[2, :E // 4] = logits[2, E // 4:E // 2]
    return logits.to(DEVICE)


def _bias(cfg, E):
    if not cfg.expert_bias:
        return None
    return (torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.05).to(DEVICE)


def _assert_equals_reference(out, ref):
    for field in FIELDS:
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    assert out.capacity == ref.capacity
    torch.testing.assert_close(out.weights_TK, ref.weights_TK, rtol=1e-5, atol=1e-6)
    for field in LOSSES:
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6)
    plan = sort_by_expert(ref)
    assert plan.parked
    for field in ("row_TK", "token_N", "ends_E"):
        assert torch.equal(getattr(out.order, field), getattr(plan, field)), field


@pytest.mark.parametrize("name,T,E,drops", CASES)
def test_capacity_routing_equals_reference_and_sort(name, T, E, drops):
    cfg = CONFIGS[name]
    logits = _logits(T, E, seed=T * 1000 + E)
    bias = _bias(cfg, E)
    capacity = cfg.capacity(T, E, training=False)
    out = route_decode_triton(logits, cfg, bias, capacity)
    ref = route_reference(logits, cfg, capacity, bias, None, None)
    assert (ref.num_dropped.item() > 0) == drops
    _assert_equals_reference(out, ref)
    # Dropped assignments weigh nothing: kept & weight 0 exactly where the reference has them.
    assert torch.equal(out.weights_TK == 0, ref.weights_TK == 0)
    # The multi-kernel router renormalises the same kept weights in torch: bit for bit under
    # the interpreter, a few fp32 ulps compiled (other reduction orders).
    fused = route_triton(logits, cfg, capacity, bias, None, None).weights_TK
    if ON_GPU:
        torch.testing.assert_close(out.weights_TK, fused, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out.weights_TK, fused)


def test_first_choices_queue_before_second_choices_then_tokens():
    """Capacity 1, top-2 (DeepSpeed): expert 1 is token 0's second choice and the first choice
    of tokens 1 and 2; token 1's first choice takes the slot (first choices before second,
    then token order), tokens 2's and 0's go. Dropped rows follow the kept ones in (token,
    choice) order."""
    cfg = RouterConfig(top_k=2, min_capacity=1)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0],  # choices 0, 1
                           [0.0, 3.0, 2.0, 0.0],  # 1, 2
                           [2.0, 3.0, 0.0, 0.0]],  # 1, 0
                          device=DEVICE)
    out = route_decode_triton(logits, cfg, None, capacity=1)
    assert out.ids_TK.tolist() == [[0, 1], [1, 2], [1, 0]]
    assert out.kept_TK.tolist() == [[True, False], [True, True], [False, False]]
    assert out.slots_TK.tolist() == [[0, 2], [0, 0], [1, 1]]
    assert out.counts_E.tolist() == [1, 1, 1, 0] and out.num_dropped.item() == 3
    assert out.weights_TK[0].tolist() == [1.0, 0.0]  # its kept route carries all its weight
    assert out.weights_TK[2].tolist() == [0.0, 0.0]
    assert out.order.row_TK.tolist() == [[0, 3], [1, 2], [4, 5]]
    assert out.order.token_N.tolist() == [0, 1, 1, 0, 2, 2]
    assert out.order.ends_E.tolist() == [1, 2, 3, 3]
    _assert_equals_reference(out, route_reference(logits, cfg, 1, None, None, None))


@pytest.mark.parametrize("defer", [False, True])
def test_dispatch_of_the_planned_layout_parks_the_dropped_rows(defer):
    """The dispatcher hands the kernel's layout on as the plan sort_by_expert would build:
    parked (rows past ends_E[-1] hold dropped assignments); gathered, or left to the experts'
    up kernel (`defer`)."""
    cfg = CONFIGS["top2"]
    T, E = 16, 16
    logits = _logits(T, E, seed=5)
    x = torch.randn(T, 8, device=DEVICE)
    routing = route_decode_triton(logits, cfg, None, cfg.capacity(T, E, training=False))
    assert routing.num_dropped.item() > 0
    x_ND, plan = LocalDispatcher(Backends(dispatch="triton"), defer).dispatch(x, routing)
    ref = sort_by_expert(route_reference(logits, cfg, routing.capacity, None, None, None))
    assert plan.parked and ref.parked
    for field in ("token_N", "row_TK", "ends_E"):
        assert torch.equal(getattr(plan, field), getattr(ref, field)), field
    if defer:
        assert x_ND is x and torch.equal(plan.gather_N, ref.token_N)
    else:
        assert plan.gather_N is None and torch.equal(x_ND, x[ref.token_N])


def _fused(x, w, cfg, bias, capacity):
    ticket = route_tickets(x.device)
    out, logits = route_decode_fused(x, w, cfg, bias, ticket, capacity)
    assert not ticket.any()  # left ready for the next launch
    return out, logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,E", [(16, 16), (37, 128)])
def test_fused_logits_capacity_routing_equals_the_unfused_kernel(name, T, E):
    """Operands that are multiples of 1/8 below 1: the fused logits equal router_logits' bit
    for bit, so every routing field must equal the unfused kernel's on them. Positive gate
    rows for experts 0-2 and positive inputs crowd those experts: assignments are dropped."""
    cfg = CONFIGS[name]
    D = 40
    g = torch.Generator().manual_seed(T * 100 + E)
    x = (torch.randint(-7, 8, (T, D), generator=g) / 8).to(DEVICE)
    w = (torch.randint(-7, 8, (E, D), generator=g) / 8).to(DEVICE)
    w[:3] = w[:3].abs()  # crowded experts
    x = x.abs()
    bias = _bias(cfg, E)
    capacity = cfg.capacity(T, E, training=False)
    out, logits = _fused(x, w, cfg, bias, capacity)
    ref_logits = router_logits(x, w)
    assert torch.equal(logits, ref_logits)
    want = route_decode_triton(ref_logits, cfg, bias, capacity)
    assert want.num_dropped.item() > 0
    for field in FIELDS + ("weights_TK",) + LOSSES:
        assert torch.equal(getattr(out, field), getattr(want, field)), field
    assert out.capacity == capacity
    for field in ("row_TK", "token_N", "ends_E"):
        assert torch.equal(getattr(out.order, field), getattr(want.order, field)), field
    _assert_equals_reference(out, route_reference(ref_logits, cfg, capacity, bias, None, None))


PATHS = {"ref": Backends.reference(),
         "before": Backends(router="triton", dispatch="triton", experts="stream"),
         "decode": Backends(router="triton_decode", dispatch="triton", experts="stream"),
         "fused": Backends(router="triton_decode_fused", dispatch="triton", experts="stream")}


@pytest.mark.parametrize("name", ["top1", "top2", "top3_sigmoid_groups"])
def test_capacity_layer_in_eval_mode_equals_reference(name):
    """An eval-mode forward (capacity from eval_capacity_factor) through each decode router
    equals the reference layer, and the multi-kernel Triton path's exactly: dropped routes
    contribute nothing, and a top-1 token whose route was dropped gets exactly 0."""
    layer, D = _layer(CONFIGS[name])
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    layer = layer.to(dtype).eval()
    T = 16
    x = torch.randn(1, T, D, device=DEVICE, dtype=dtype)
    outs = {}
    with torch.no_grad():
        for label, backends in PATHS.items():
            set_backends(layer, backends)
            outs[label] = layer(x)
        set_backends(layer, PATHS["decode"])
        layer.experts = SortedRowsOnly(layer.experts)  # the offload engine's kind of module
        outs["sorted_rows"] = layer(x)
    (y_ref, r_ref), y_before = outs["ref"], outs["before"][0]
    assert r_ref.capacity == CONFIGS[name].capacity(T, 16 if not ON_GPU else 64, False)
    assert r_ref.num_dropped.item() > 0
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for label in ("decode", "fused", "sorted_rows"):
        y, r = outs[label]
        assert r.order is not None, label
        assert torch.equal(r.ids_TK, r_ref.ids_TK) and torch.equal(r.kept_TK, r_ref.kept_TK)
        assert _rel(y, y_ref) < tol, label
        if label == "fused":  # its logits are summed in another order: to fp32 rounding
            assert _rel(y, outs["decode"][0]) < 1e-5
        elif ON_GPU:  # the combine weights' last fp32 bits can move a bf16 product
            assert _rel(y, y_before) < 4e-3, label
        else:
            assert torch.equal(y, y_before), label
    assert torch.equal(outs["sorted_rows"][0], outs["decode"][0])  # gathered in or before
    if CONFIGS[name].top_k == 1:
        dropped_T = ~r_ref.kept_TK[:, 0]
        assert dropped_T.any()
        assert (outs["decode"][0][0, dropped_T] == 0).all()
        assert (y_ref[0, dropped_T] == 0).all()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _routes_with_decode(router, x, inference=False):
    """Whether `router` routed `x` with a decode kernel (the plan comes with the routing)."""
    out = router(x, inference=inference)
    return out.order is not None, out


@pytest.mark.parametrize("fused", [False, True])
def test_router_takes_the_decode_kernels_for_capacity_where_they_apply(fused):
    backends = Backends(router="triton_decode_fused" if fused else "triton_decode")
    T, D, E = 6, 16, 8
    x = torch.randn(T, D, device=DEVICE)

    def router(**overrides):
        torch.manual_seed(0)
        cfg = RouterConfig(top_k=2, capacity_factor=0.5, eval_capacity_factor=1.0,
                           min_capacity=1, **overrides)
        return Router(D, E, cfg, backends).to(DEVICE).eval()

    with torch.no_grad():
        plain = router()
        taken, out = _routes_with_decode(plain, x)
        assert taken and out.capacity == plain.config.capacity(T, E, training=False)
        ref = route_reference(router_logits(x, plain.gate.weight), plain.config, out.capacity,
                              None, None, None)
        assert torch.equal(out.kept_TK, ref.kept_TK) and out.num_dropped.item() > 0
        # Training mode without autograd: the training capacity, still the reference's drops.
        taken, out = _routes_with_decode(plain.train(), x)
        assert taken and out.capacity == plain.config.capacity(T, E, training=True)
        # Served (inference=True): dropless, as before.
        taken, out = _routes_with_decode(plain.eval(), x, inference=True)
        assert taken and out.capacity is None
        # Random Token Selection draws its order from the RNG: the multi-kernel router.
        taken, out = _routes_with_decode(router(drop_policy="random"), x)
        assert not taken and out.capacity is not None
        # ... but served, dropless, nothing is dropped and the drop policy does not matter.
        assert _routes_with_decode(router(drop_policy="random"), x, inference=True)[0]
        # Gumbel noise in training; eval mode adds none.
        noisy = router(noise="rsample_second")
        assert _routes_with_decode(noisy, x)[0]
        assert not _routes_with_decode(noisy.train(), x)[0]
        # Statistics summed over ranks.
        reduced = Router(D, E, plain.config, backends, stats_reduce=lambda c: c * 2)
        assert not _routes_with_decode(reduced.to(DEVICE).eval(), x)[0]
    # Autograd through the gate: the one launch too (the logits by torch where fused), its
    # backward route_triton's, renormalising over the kept routes (test_ops_decode_route_grad).
    taken, out = _routes_with_decode(plain, x)
    assert taken and out.weights_TK.requires_grad and out.num_dropped.item() > 0
    grouped = RouterConfig(top_k=1, min_capacity=1, expert_groups=(("text", 4), ("image", 4)))
    with torch.no_grad(), pytest.raises(ValueError, match="expert groups"):
        Router(D, E, grouped, backends).to(DEVICE).eval()(x)
