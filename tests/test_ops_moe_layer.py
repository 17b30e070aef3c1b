"""Layer-level equivalence: an MoE layer on every fast path equals the all-reference layer,
forward and backward (router, dispatch, experts and combine together)."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402


@pytest.mark.parametrize("router_cfg,shared", [
    (RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1), 0),
    (RouterConfig(top_k=4, score_func="sigmoid", dropless=True, normalize_topk=True,
                  num_groups=2, topk_groups=1, expert_bias=True, routed_scaling=2.0), 1)])
def test_fast_layer_matches_reference(router_cfg, shared):
    D, F, E, T = (512, 256, 16, 1024) if ON_GPU else (32, 16, 8, 40)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, num_shared_experts=shared,
                   shared_d_ff=F * shared, router=router_cfg)
    layer = MoELayer(spec, D, "swiglu", bias=False).to(DEVICE)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=D ** -0.5)
    layer = layer.to(dtype)
    x = torch.randn(2, T // 2, D, device=DEVICE, dtype=dtype)
    g = torch.randn_like(x)
    results = []
    for paths in (("reference",) * 3, ("triton", "triton", "grouped_mm_fused")):
        set_backends(layer, Backends(*paths))
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, routing = layer(xi)
        (y * g).sum().add(routing.loss).backward()
        grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
        results.append((y.float(), xi.grad.float(), grads, routing))
    (y0, gx0, gr0, r0), (y1, gx1, gr1, r1) = results
    assert torch.equal(r0.ids_TK, r1.ids_TK) and torch.equal(r0.counts_E, r1.counts_E)
    # fp32: the paths differ in the order of their sums only (measured ≤ 1.6e-7 relative)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
    assert rel(y1, y0) < tol
    assert rel(gx1, gx0) < tol
    for name in gr0:
        assert rel(gr1[name], gr0[name]) < tol, name


@pytest.mark.parametrize("router_cfg", [
    RouterConfig(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1),
    RouterConfig(top_k=2, dropless=True, normalize_topk=True)])
@pytest.mark.parametrize("experts", ["grouped_mm_fused", "tiled", "persistent", "stream"])
def test_inference_layer_leaves_the_gather_to_the_experts(router_cfg, experts):
    """Without autograd the Triton dispatch only plans (x_TD goes to the experts with the
    token of each row), the experts gather; the layer equals the all-reference one, dropped
    assignments included."""
    D, F, E, T = (512, 256, 16, 1024) if ON_GPU else (32, 16, 8, 40)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, router=router_cfg)
    layer = MoELayer(spec, D, "swiglu", bias=False).to(DEVICE)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=D ** -0.5)
    layer = layer.to(dtype).eval()
    x = torch.randn(2, T // 2, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y0, r0 = layer(x)  # Backends() on the CPU: the reference paths
        set_backends(layer, Backends(router="triton", dispatch="triton", experts=experts))
        x_ND, plan = layer.dispatcher.dispatch(x.reshape(T, D), r0)
        assert x_ND.data_ptr() == x.data_ptr() and plan.gather_N is not None
        y1, r1 = layer(x)
    assert torch.equal(r0.ids_TK, r1.ids_TK) and torch.equal(r0.kept_TK, r1.kept_TK)
    assert (int(r0.num_dropped) > 0) == (not router_cfg.dropless)
    # fp32: the paths differ in the order of their sums only (measured ≤ 1.6e-7 relative)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((y1.float() - y0.float()).norm() / y0.float().norm()).item() < tol
