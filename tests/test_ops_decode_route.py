"""The one-launch decode router (moeflow.ops.decode_route_triton) and the MoE layer's decode
path: routing equals route_reference and the plan equals sort_by_expert exactly (weights to fp32
rounding, and bit for bit the multi-kernel fused router's); the layer's output equals the
reference layer's, and the old Triton path's exactly."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.dispatch import LocalDispatcher, sort_by_expert  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.model.router import Router, route_reference  # noqa: E402
from moeflow.ops import backend  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops.decode_route_triton import route_decode_triton  # noqa: E402
from moeflow.ops.routing_triton import route_triton  # noqa: E402

CONFIGS = {  # name: (config, has expert bias)
    # Qwen3 / Mixtral: softmax, first choice by probability, later ones by logits; renormalised.
    "qwen3_top8": (RouterConfig(top_k=8, normalize_topk=True, dropless=True,
                                aux_loss_coef=1e-3), False),
    # DeepSpeed's top-2 (balance loss on first choices), served: eval capacity off.
    "top2_deepspeed": (RouterConfig(top_k=2, eval_capacity_factor=None, z_loss_coef=1e-3),
                       False),
    # DeepSpeed-MoE's top-1: raw probabilities, capacity in training, dropless when served.
    "top1_deepspeed": (RouterConfig(top_k=1), False),
    # DeepSeek-V3: sigmoid scores + expert bias within the best groups, scaled.
    "deepseek_v3": (RouterConfig(top_k=4, score_func="sigmoid", normalize_topk=True,
                                 routed_scaling=2.5, num_groups=4, topk_groups=2,
                                 expert_bias=True, dropless=True, z_loss_coef=1e-3), True),
}


def _logits(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    logits[:, E // 2] = logits[:, 1]  # ties between experts: the lower index wins
    if T > 2:
        logits[1] = 0.5  # a token whose scores all tie
        logits[2, :E // 4] = logits[2, E // 4:E // 2]
    if T > 4:
        logits[3] -= 20  # every logit negative (DeepSpeed ranks later choices by them)
        # -0 ties +0: the lower expert wins (DeepSpeed's second choice is by the logits).
        logits[4] = -5.0
        logits[4, 1], logits[4, 2], logits[4, 6] = 5.0, -0.0, 0.0
    return logits.to(DEVICE)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,E", [(1, 16), (16, 16), (37, 128)])
def test_decode_route_equals_reference_and_sort(name, T, E):
    """(37, 128): several blocks of tokens (16 per block) and of assignments (64 per block)
    in one program."""
    cfg, has_bias = CONFIGS[name]
    logits = _logits(T, E, seed=T * 1000 + E)
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.05).to(DEVICE) \
        if has_bias else None
    out = route_decode_triton(logits, cfg, bias)
    ref = route_reference(logits, cfg, None, bias, None, None)
    for field in ("ids_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    assert out.capacity is None
    torch.testing.assert_close(out.weights_TK, ref.weights_TK, rtol=1e-5, atol=1e-6)
    for field in ("aux_loss", "z_loss", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5,
                                   atol=1e-6)
    plan = sort_by_expert(ref)
    assert torch.equal(out.order.row_TK, plan.row_TK)
    assert torch.equal(out.order.token_N, plan.token_N)
    assert torch.equal(out.order.ends_E, plan.ends_E)
    # The same choice code as the multi-kernel fused router: equal weights, bit for bit under
    # the interpreter; compiled with other block sizes and warps, reductions may sum in another
    # order on the GPU (a few fp32 ulps).
    fused = route_triton(logits, cfg, None, bias, None, None).weights_TK
    if ON_GPU:
        torch.testing.assert_close(out.weights_TK, fused, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out.weights_TK, fused)


def test_router_takes_the_decode_kernel_only_where_it_applies():
    torch.manual_seed(0)
    cfg = RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1)
    router = Router(16, 8, cfg, Backends(router="triton_decode")).to(DEVICE)
    x = torch.randn(6, 16, device=DEVICE)
    with torch.no_grad():
        assert router(x, inference=True).order is not None
        router.train()
        trained = router(x)  # a capacity dropping in position order: the one launch too
        assert trained.order is not None and trained.capacity is not None
        rts_cfg = RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1,
                               drop_policy="random")
        rts = Router(16, 8, rts_cfg, Backends(router="triton_decode")).to(DEVICE)(x)
        assert rts.order is None and rts.capacity is not None  # RTS: the multi-kernel router
    # Under autograd: one launch too, dropless as served and with the capacity in training
    # (test_ops_decode_route_grad).
    assert router(x, inference=True).order is not None
    assert router(x).order is not None
    # auto: plain torch off CUDA; the decode kernel above the bound is route_triton
    logits = torch.zeros(4, 8, device=DEVICE)
    B = backend.DECODE_ROUTE_MAX_ASSIGNMENTS
    assert backend.resolve_router_backend("auto", logits, cfg, bound=B) == (
        "triton_decode" if ON_GPU else "reference")
    # ... and on CUDA "auto" routes decode calls with the fused-logits kernel before that
    x_TD = torch.zeros(4, 16, device=DEVICE)
    assert backend.router_fuses_logits("auto", x_TD, cfg, 8, bound=B) == ON_GPU
    assert not backend.router_fuses_logits("auto", x_TD, cfg, 8, bound=0)
    assert backend.router_fuses_logits("triton_decode_fused", x_TD, cfg, 8, bound=B)
    assert not backend.router_fuses_logits("triton_decode", x_TD, cfg, 8, bound=B)
    big = torch.zeros(backend.DECODE_ROUTE_MAX_ASSIGNMENTS // 2 + 1, 8, device=DEVICE)
    assert backend.resolve_router_backend("triton_decode", big, cfg, bound=B) == "triton"
    assert backend.resolve_router_backend("triton_decode", logits, cfg, bound=0) == "triton"
    grouped = RouterConfig(top_k=1, expert_groups=(("text", 4), ("image", 4)))
    with pytest.raises(ValueError, match="expert groups"):
        backend.resolve_router_backend("triton_decode", logits, grouped, bound=B)


def test_decode_route_bound_does_not_move_while_a_graph_is_captured(monkeypatch):
    """The engine replays captured prefills and must produce what the same forward gives
    uncaptured, so no routing choice may depend on capture: the fused decode router routes by
    its own logits sum order, and a bound that moved with capture flipped near-tie experts
    between the two (the engine's captured = uncaptured test failed on the H200)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = RouterConfig(top_k=2, dropless=True)
    bound = backend.DECODE_ROUTE_MAX_ASSIGNMENTS
    with FakeTensorMode():
        calls = [torch.empty(T, 16, device="cuda") for T in (1, bound // 4, bound // 2,
                                                              bound // 2 + 1)]
        decided = {}
        for capturing in (False, True):
            monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda c=capturing: c)
            decided[capturing] = [backend.decode_route_fits(x, cfg, bound) for x in calls]
    assert decided[False] == decided[True] == [True, True, True, False]


class SortedRowsOnly(nn.Module):
    """An experts module with the offload engine's call (x_ND, ends_E, parked): sorted rows."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x_ND, ends_E, parked=True):
        return self.inner(x_ND, ends_E, parked)


def _layer(router, shared):
    D, F, E = (512, 256, 64) if ON_GPU else (32, 16, 16)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, num_shared_experts=shared,
                   shared_d_ff=F * shared, router=router)
    layer = MoELayer(spec, D, "swiglu", bias=False).to(DEVICE)
    for p in layer.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(0, 0.05)
    return layer.to(dtype), D, dtype


DECODE = Backends(router="triton_decode", dispatch="triton", experts="stream")
BEFORE = Backends(router="triton", dispatch="triton", experts="stream")


@pytest.mark.parametrize("name,shared", [("qwen3_top8", 0), ("deepseek_v3", 1)])
@pytest.mark.parametrize("T", [1, 16])
def test_decode_layer_equals_reference_and_the_multi_kernel_path(name, shared, T):
    layer, D, dtype = _layer(CONFIGS[name][0], shared)
    x = torch.randn(1, T, D, device=DEVICE, dtype=dtype)
    outs = {}
    with torch.no_grad():
        for label, backends in (("ref", Backends.reference()), ("before", BEFORE),
                                ("decode", DECODE)):
            set_backends(layer, backends)
            outs[label] = layer(x, inference=True)
        layer.experts = SortedRowsOnly(layer.experts)  # the offload engine's kind of module
        outs["sorted_rows"] = layer(x, inference=True)
    (y_ref, r_ref), (y_before, _), (y, r) = outs["ref"], outs["before"], outs["decode"]
    assert r.order is not None and torch.equal(r.ids_TK, r_ref.ids_TK)
    # bf16: the reference's per-expert matmuls and the streaming kernels round differently
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    rel = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    assert rel < tol
    # Same rows through the same expert kernels: equal, up to the combine weights' last fp32
    # bits on the GPU (see above), which can move a bf16 product by one rounding step.
    if ON_GPU:
        rel_before = ((y.float() - y_before.float()).norm() / y_before.float().norm()).item()
        assert rel_before < 4e-3
    else:
        assert torch.equal(y, y_before)
    assert torch.equal(outs["sorted_rows"][0], y)  # gathered in the kernel or before it


def test_a_dispatcher_that_does_not_defer_gathers_the_planned_rows():
    """The expert-parallel dispatchers sort through a LocalDispatcher and send x_ND to other
    ranks: with the router's plan it must still return the sorted rows."""
    cfg = CONFIGS["qwen3_top8"][0]
    logits = _logits(5, 16, seed=3)
    x = torch.randn(5, 8, device=DEVICE)
    routing = route_decode_triton(logits, cfg, None)
    for defer in (False, True):
        x_ND, plan = LocalDispatcher(Backends(dispatch="triton"), defer).dispatch(x, routing)
        ref = sort_by_expert(route_reference(logits, cfg, None, None, None, None))
        assert torch.equal(plan.token_N, ref.token_N) and not plan.parked
        if defer:
            assert x_ND is x and torch.equal(plan.gather_N, ref.token_N)
        else:
            assert plan.gather_N is None and torch.equal(x_ND, x[ref.token_N])


MOE_KERNELS = ("_decode_route_kernel", "_decode_route_logits_kernel", "_topk_kernel",
               "_queue_kernel", "_scan_kernel", "_finalize_kernel", "_dispatch_kernel",
               "_up_kernel", "_down_kernel", "_moe_stream_kernel", "_sum_rows_kernel")


def _cuda_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.skipif(not ON_GPU, reason="kernel launches are counted on CUDA")
@pytest.mark.parametrize("T", [1, 16])
def test_decode_layer_launches_route_experts_combine(T):
    """Issue 14: a decode MoE layer launches three kernels under "auto": the router's logits
    with routing and the dispatch plan, the experts (up and down in one launch), combine."""
    layer, D, dtype = _layer(CONFIGS["qwen3_top8"][0], 0)
    set_backends(layer, Backends())
    x = torch.randn(1, T, D, device=DEVICE, dtype=dtype)
    x_TD = x.view(T, D)
    with torch.no_grad():
        for _ in range(2):  # compile the logits' fused twin, autotune the stream kernels
            layer(x, inference=True)
        names = _cuda_kernels(lambda: layer(x, inference=True))
        logits = _cuda_kernels(lambda: layer.router.forward(x_TD, inference=True))
    moe = sorted(n for n in names if n.startswith(MOE_KERNELS))
    assert moe == sorted(["_decode_route_logits_kernel", "_moe_stream_kernel",
                          "_sum_rows_kernel"]), names
    # the router's one launch computes its logits and routes; nothing else runs
    assert logits == ["_decode_route_logits_kernel"] and len(names) == 3, (names, logits)
