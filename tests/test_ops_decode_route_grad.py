"""The one-launch router under autograd (training calls of up to 1024 assignments): the same
routing and the same gradients as the multi-kernel route_triton, whose backward kernel it
shares, and plain torch's gradients, for every balance-count source the backward reads (the
kernel's counts, first choices only, counts before a capacity's drops) and DeepSpeed's top-2
renormalisation over a capacity's kept routes; the MoE layer's fwd+bwd through it equals the
multi-kernel path's."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.model.router import Router  # noqa: E402
from moeflow.ops import backend  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402

CONFIGS = {
    # dropless, every choice counted: the backward reads the kernel's counts
    "qwen3_top4": RouterConfig(top_k=4, normalize_topk=True, dropless=True, aux_loss_coef=1e-2,
                               z_loss_coef=1e-3),
    # dropless top-2 balanced on first choices (DeepSpeed's rule): the backward counts them
    "mixtral_top2": RouterConfig(top_k=2, normalize_topk=True, dropless=True,
                                 aux_loss_coef=1e-2),
    # DeepSpeed-MoE's top-1 with a capacity: drops; the balance counts precede them
    "top1_capacity": RouterConfig(top_k=1, capacity_factor=1.0, min_capacity=1,
                                  z_loss_coef=1e-3),
    # DeepSpeed's top-2 with a capacity: the kept weights renormalised, first-choice balance
    "top2_capacity": RouterConfig(top_k=2, capacity_factor=0.75, min_capacity=1,
                                  z_loss_coef=1e-3, routed_scaling=1.5),
    # sigmoid scores, expert bias in the choice, groups, scaled weights
    "deepseek_v3": RouterConfig(top_k=4, score_func="sigmoid", normalize_topk=True,
                                routed_scaling=2.5, num_groups=4, topk_groups=2,
                                expert_bias=True, dropless=True, z_loss_coef=1e-3),
}


def _router(cfg, D, E):
    torch.manual_seed(0)
    router = Router(D, E, cfg).to(DEVICE).train()
    nn.init.normal_(router.gate.weight, std=0.5)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    return router


def _assert_equal(a, b, what, gpu_rel=1e-5):
    """Equal on the CPU (the interpreter runs one program's arithmetic in one order); on the
    GPU within `gpu_rel` of b's norm: compiled with other tiles the two routers' weights may
    differ in their last fp32 bits, and a bf16 product then by one rounding step."""
    if ON_GPU:
        rel = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        assert rel < gpu_rel, (what, rel)
    else:
        assert torch.equal(a, b), what


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("used", ["weights", "loss", "both"])
def test_one_launch_router_trains_like_route_triton(name, used):
    cfg = CONFIGS[name]
    T, D, E = (24, 64, 16) if ON_GPU else (11, 16, 16)
    router = _router(cfg, D, E)
    x0 = torch.randn(T, D, device=DEVICE)
    ramp = torch.linspace(-1, 1, T * cfg.top_k, device=DEVICE).view(T, cfg.top_k)
    runs = {}
    for router_name in ("reference", "triton", "triton_decode"):
        set_backends(router, Backends(router=router_name))
        x = x0.clone().requires_grad_(True)
        router.zero_grad()
        r = router(x)
        loss = 0.0
        if used in ("weights", "both"):
            loss = loss + (r.weights_TK * ramp).sum()
        if used in ("loss", "both"):
            loss = loss + 3.0 * r.loss
        loss.backward()
        runs[router_name] = (r, x.grad, router.gate.weight.grad.clone())
    (r_multi, gx_multi, gw_multi), (r, gx, gw) = runs["triton"], runs["triton_decode"]
    assert r.order is not None and r_multi.order is None  # each path ran
    _, gx_ref, gw_ref = runs["reference"]  # plain torch's autograd: the math itself
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    for field in ("ids_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped"):
        assert torch.equal(getattr(r, field), getattr(r_multi, field)), field
    _assert_equal(r.weights_TK, r_multi.weights_TK, "weights")
    if cfg.capacity_factor is not None and not cfg.dropless:
        assert r.num_dropped.item() > 0  # the capacity dropped some: kept flags matter
    torch.testing.assert_close(r.loss, r_multi.loss, rtol=1e-5, atol=1e-7)
    assert gx.abs().sum() > 0
    _assert_equal(gx, gx_multi, "x grad")
    _assert_equal(gw, gw_multi, "gate grad")


def test_one_launch_bound():
    """Training calls (never captured) up to TRAIN_ROUTE_MAX_ASSIGNMENTS, served ones up to
    DECODE_ROUTE_MAX_ASSIGNMENTS; none with Random Token Selection, Gumbel noise, statistics
    summed over ranks."""
    dropless = RouterConfig(top_k=2, normalize_topk=True, dropless=True)
    top2 = RouterConfig(top_k=2, capacity_factor=1.0)  # renormalises over its kept routes
    rts = RouterConfig(top_k=1, capacity_factor=1.0, drop_policy="random")
    serve, train = backend.DECODE_ROUTE_MAX_ASSIGNMENTS, backend.TRAIN_ROUTE_MAX_ASSIGNMENTS
    assert serve < train
    assert backend.one_launch_bound(dropless, None, "none", False, grad=False) == serve
    assert backend.one_launch_bound(dropless, None, "jitter", False, grad=True) == train
    assert backend.one_launch_bound(top2, 4, "none", False, grad=False) == serve
    assert backend.one_launch_bound(top2, 4, "none", False, grad=True) == train
    assert backend.one_launch_bound(top2, None, "none", False, grad=True) == train
    assert backend.one_launch_bound(rts, 4, "none", False, grad=False) == 0
    assert backend.one_launch_bound(dropless, None, "rsample", False, grad=False) == 0
    assert backend.one_launch_bound(dropless, None, "none", True, grad=True) == 0


def test_training_calls_take_the_one_launch_above_the_served_bound():
    """400 assignments: one launch with a gradient (equal to route_triton's routing and
    gradients), route_triton without."""
    cfg = CONFIGS["qwen3_top4"]
    E, D = 16, 16
    T = backend.DECODE_ROUTE_MAX_ASSIGNMENTS // cfg.top_k + 36
    router = _router(cfg, D, E)
    x0 = torch.randn(T, D, device=DEVICE)
    served = backend.one_launch_bound(cfg, None, "none", False, grad=False)
    trained = backend.one_launch_bound(cfg, None, "none", False, grad=True)
    assert not backend.decode_route_fits(x0, cfg, served)  # served: above its bound
    assert backend.decode_route_fits(x0, cfg, trained)
    runs = {}
    for name in ("triton", "triton_decode"):
        set_backends(router, Backends(router=name))
        router.zero_grad()
        x = x0.clone().requires_grad_(True)
        r = router(x)
        ((r.weights_TK * r.weights_TK).sum() + r.loss).backward()
        runs[name] = (r, x.grad)
    (r_multi, gx_multi), (r, gx) = runs["triton"], runs["triton_decode"]
    assert r.order is not None and r_multi.order is None
    assert torch.equal(r.ids_TK, r_multi.ids_TK)
    _assert_equal(r.weights_TK, r_multi.weights_TK, "weights")
    _assert_equal(gx, gx_multi, "x grad")


TRAIN = dict(dispatch="triton", experts="grouped_mm_fused" if ON_GPU else "reference")


@pytest.mark.parametrize("name", ["qwen3_top4", "top1_capacity", "top2_capacity"])
def test_moe_layer_trains_through_the_one_launch_router(name):
    """fwd+bwd of the layer: the planned rows gathered by gather_planned_triton give the same
    output and gradients as the multi-kernel router with the Triton dispatch."""
    D, F, E, T = (256, 128, 16, 24) if ON_GPU else (16, 8, 8, 9)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, router=CONFIGS[name])
    layer = MoELayer(spec, D, "swiglu", bias=False).to(DEVICE).train()
    for p in layer.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    layer = layer.to(dtype)
    x0 = torch.randn(T, D, device=DEVICE, dtype=dtype)
    g = torch.randn(T, D, device=DEVICE, dtype=dtype)
    runs = {}
    for router_name in ("triton", "triton_decode"):
        set_backends(layer, Backends(router=router_name, **TRAIN))
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        y, r = layer(x)
        ((y * g).sum() + r.loss).backward()
        runs[router_name] = (r.order is not None, y.detach(), x.grad,
                         {n: p.grad.clone() for n, p in layer.named_parameters()})
    (planned_multi, y_multi, gx_multi, grads_multi) = runs["triton"]
    (planned, y, gx, grads) = runs["triton_decode"]
    assert planned and not planned_multi
    _assert_equal(y, y_multi, "output", gpu_rel=4e-3)
    _assert_equal(gx, gx_multi, "x grad", gpu_rel=4e-3)
    for n, grad in grads.items():
        assert grad.abs().sum() > 0, n
        _assert_equal(grad, grads_multi[n], n, gpu_rel=4e-3)
