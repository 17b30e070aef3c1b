"""Fused routing kernels vs the plain-torch router: ids, slots, kept, counts exact; weights and
losses to fp32 rounding; gradients of the gate through weights, aux and z losses."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.config import RouterConfig  # noqa: E402
from moeflow.model.dispatch import sort_by_expert  # noqa: E402
from moeflow.model.router import Router  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops import routing_triton  # noqa: E402

CONFIGS = {
    "top1_capacity": RouterConfig(top_k=1, capacity_factor=1.0, min_capacity=1, z_loss_coef=1e-3),
    "top2_position": RouterConfig(top_k=2, capacity_factor=0.75, min_capacity=1,
                                  z_loss_coef=1e-2),
    "top2_rts_jitter": RouterConfig(top_k=2, capacity_factor=1.0, drop_policy="random",
                                    noise="jitter"),
    "top3_dropless_norm": RouterConfig(top_k=3, dropless=True, normalize_topk=True),
    "rsample": RouterConfig(top_k=2, capacity_factor=1.25, noise="rsample"),
    # DeepSpeed's top-2 with a sampled second expert; weights renormalised after dropping.
    "top2_rsample_second": RouterConfig(top_k=2, capacity_factor=0.75, noise="rsample_second",
                                        min_capacity=1),
    "top2_unnormalised_all_choices": RouterConfig(top_k=2, capacity_factor=0.75, min_capacity=1,
                                                  normalize_topk=False, aux_loss_choices="all",
                                                  routed_scaling=1.5),
    "top3_capacity_normalised": RouterConfig(top_k=3, capacity_factor=0.5, min_capacity=1,
                                             normalize_topk=True, routed_scaling=2.0),
    "deepseek_v3": RouterConfig(top_k=4, score_func="sigmoid", dropless=True,
                                normalize_topk=True, routed_scaling=2.5, num_groups=4,
                                topk_groups=2, expert_bias=True, z_loss_coef=1e-3),
    "sigmoid_capacity": RouterConfig(top_k=2, score_func="sigmoid", capacity_factor=1.0,
                                     expert_bias=True),
}


def _route(router, x, backend, seed):
    set_backends(router, Backends(router=backend))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    router.zero_grad()
    r = router(x, generator=gen)
    g_w = torch.randn(r.weights_TK.shape, device=DEVICE, generator=torch.Generator(
        device=DEVICE).manual_seed(seed + 1))
    ((r.weights_TK * g_w).sum() + 0.3 * r.aux_loss + 0.7 * r.z_loss + r.loss).backward()
    return r, x.grad, router.gate.weight.grad.clone()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("multi_block", [False, True])
def test_fused_routing_matches_reference(name, multi_block, monkeypatch):
    if multi_block:  # force the histogram → cumsum → slots path on small inputs
        monkeypatch.setattr(routing_triton, "_SERIAL_LIMIT", 8)
    cfg = CONFIGS[name]
    T, D, E = (4096, 256, 64) if ON_GPU else (37, 16, 16)
    torch.manual_seed(0)  # weights and inputs; `seed` drives the noise and the RTS order
    seed = 1234
    router = Router(D, E, cfg).to(DEVICE).train()
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    x = torch.randn(T, D, device=DEVICE)
    ref, gx_ref, gw_ref = _route(router, x, "reference", seed)
    out, gx, gw = _route(router, x, "triton", seed)
    for field in ("ids_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    assert out.capacity == ref.capacity
    torch.testing.assert_close(out.weights_TK, ref.weights_TK, rtol=1e-5, atol=1e-6)
    for field in ("aux_loss", "z_loss", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    if cfg.capacity_factor < 1 and not cfg.dropless:
        assert ref.num_dropped.item() > 0  # the drop path was exercised


@pytest.mark.parametrize("name", ["top1_capacity", "top3_dropless_norm", "deepseek_v3"])
@pytest.mark.parametrize("used", ["weights", "loss"])
def test_fused_routing_gradient_through_one_output(name, used):
    """The backward with only the weights or only the loss used (the other output's gradient
    is None, not a zero tensor, in the fused router's backward) equals the reference's."""
    cfg = CONFIGS[name]
    T, D, E = (512, 64, 64) if ON_GPU else (21, 16, 16)
    torch.manual_seed(0)
    router = Router(D, E, cfg).to(DEVICE).train()
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    x0 = torch.randn(T, D, device=DEVICE)
    grads = []
    for backend in ("reference", "triton"):
        set_backends(router, Backends(router=backend))
        x = x0.clone().requires_grad_(True)
        router.zero_grad()
        r = router(x)
        if used == "weights":
            (r.weights_TK * torch.linspace(-1, 1, r.weights_TK.numel(), device=DEVICE)
             .view_as(r.weights_TK)).sum().backward()
        else:
            (3.0 * r.loss).backward()
        grads.append((x.grad, router.gate.weight.grad.clone()))
    (gx_ref, gw_ref), (gx, gw) = grads
    assert gx.abs().sum() > 0
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def _route_inference(router, x):
    """(reference, triton) routings of x as served: no capacity, no autograd."""
    with torch.no_grad():
        set_backends(router, Backends(router="reference"))
        ref = router(x, inference=True)
        set_backends(router, Backends(router="triton"))
        return ref, router(x, inference=True)


def test_eval_dropless_routing_matches_reference():
    """A capacity config routed as served (no capacity): the integer fields exactly; the top-2
    weights, renormalised to sum 1 (the reference's softmax → gather → divide), and the aux,
    z and weighted losses (the reference computes them in inference too) to fp32 rounding:
    the kernel's exponentials and sums differ in the last bits."""
    cfg = RouterConfig(top_k=2, capacity_factor=1.0)
    assert cfg.normalizes and cfg.aux_loss_coef > 0
    T, D, E = (512, 128, 32) if ON_GPU else (19, 8, 8)
    torch.manual_seed(0)
    router = Router(D, E, cfg).to(DEVICE).eval()
    ref, out = _route_inference(router, torch.randn(T, D, device=DEVICE))
    assert out.capacity is None
    assert torch.equal(out.slots_TK, ref.slots_TK) and torch.equal(out.counts_E, ref.counts_E)
    assert torch.equal(out.ids_TK, ref.ids_TK) and bool(out.kept_TK.all())
    assert torch.equal(out.num_dropped, ref.num_dropped)
    # the file's fp32-rounding bound: rtol 1e-5 ~ 84 ulps, atol 1e-6 ~ 8 ulps of a weight <= 1;
    # unnormalised, a token's two weights would sum to its top-2 probability, far below 1
    for field in ("weights_TK", "aux_loss", "z_loss", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, field=field: f"{field}: {m}")


@pytest.mark.parametrize("name,T", [("top3_dropless_norm", 37), ("deepseek_v3", 37),
                                    ("top2_dropless_first_choice", 301)])
def test_dropless_inference_routing_plans_the_reference_layout(name, T, monkeypatch):
    """Without autograd the dropless kernels also return the expert-sorted layout: it must be
    sort_by_expert's row for row, with every routing field and loss the reference's. With the
    scan's tiles cut to 16 blocks, T = 301 (151 token blocks of 2) takes ten steps of its loop."""
    monkeypatch.setattr(routing_triton, "_SCAN_TILE", 64)
    cfg = CONFIGS.get(name) or RouterConfig(top_k=2, dropless=True, z_loss_coef=1e-2)
    assert cfg.balance_on_first_choice == (name == "top2_dropless_first_choice")
    D, E = (64, 16) if not ON_GPU else (256, 64)
    torch.manual_seed(0)
    router = Router(D, E, cfg).to(DEVICE).eval()
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    ref, out = _route_inference(router, torch.randn(T, D, device=DEVICE))
    assert ref.order is None and out.order is not None
    for field in ("ids_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    for field in ("weights_TK", "aux_loss", "z_loss", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6)
    want = sort_by_expert(ref)
    assert torch.equal(out.order.row_TK, want.row_TK)
    assert torch.equal(out.order.token_N, want.token_N)
    assert torch.equal(out.order.ends_E, want.ends_E)


class _OtherRanks:
    """A stats_reduce standing in for the all-reduce over data-parallel ranks: adds fixed counts
    of other ranks' tokens, and counts its calls."""

    def __init__(self, E: int) -> None:
        self.other_E = torch.randint(0, 50, (E,), generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def __call__(self, counts_E: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return counts_E + self.other_E.to(counts_E.device)


@pytest.mark.parametrize("name", ["top2_position", "top3_dropless_norm", "sigmoid_capacity",
                                  "top2_unnormalised_all_choices"])
def test_fused_routing_with_reduced_statistics_matches_reference(name):
    """Under data parallelism both paths compute the aux loss once, from the reduced balance
    counts (f_e of the global batch, P_e of this rank): values and gate gradients agree, the
    reduction runs once per call, and the counts after dropping stay this rank's."""
    cfg = CONFIGS[name]
    T, D, E = (4096, 256, 64) if ON_GPU else (37, 16, 16)
    torch.manual_seed(0)
    reduce = _OtherRanks(E)
    router = Router(D, E, cfg, stats_reduce=reduce).to(DEVICE).train()
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    x = torch.randn(T, D, device=DEVICE)
    ref, gx_ref, gw_ref = _route(router, x, "reference", 7)
    out, gx, gw = _route(router, x, "triton", 7)
    assert reduce.calls == 2
    assert torch.equal(out.counts_E, ref.counts_E) and int(ref.counts_E.sum()) <= T * cfg.top_k
    local = Router(D, E, cfg).to(DEVICE).train()
    local.load_state_dict(router.state_dict())
    alone, _, _ = _route(local, x, "reference", 7)
    assert not torch.allclose(alone.aux_loss, ref.aux_loss)  # the reduction changed f_e
    for field in ("aux_loss", "z_loss", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
