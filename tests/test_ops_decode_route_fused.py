"""The decode router that computes its own logits (moeflow.ops.decode_route_fused_triton's
route_decode_fused, router backend "triton_decode_fused"): its logits are router_logits' (fp32
products of upcast operands, summed in another order: equal to fp32 rounding, exactly where the
sums are exact), its routing is route_decode_triton's on those logits field for field, and the
MoE layer on it equals the reference layer."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moeflow.config import FFNSpec, RouterConfig  # noqa: E402
from moeflow.model.moe import MoELayer  # noqa: E402
from moeflow.model.router import Router, router_logits  # noqa: E402
from moeflow.ops.backend import Backends, set_backends  # noqa: E402
from moeflow.ops.decode_route_fused_triton import (logits_tiles, route_decode_fused,  # noqa: E402
                                                   route_tickets, route_warps)
from moeflow.ops.decode_route_triton import route_decode_triton  # noqa: E402

CONFIGS = {  # name: (config, has expert bias)
    "qwen3_top8": (RouterConfig(top_k=8, normalize_topk=True, dropless=True,
                                aux_loss_coef=1e-3), False),
    "top1_deepspeed": (RouterConfig(top_k=1, z_loss_coef=1e-3), False),
    "deepseek_v3": (RouterConfig(top_k=4, score_func="sigmoid", normalize_topk=True,
                                 routed_scaling=2.5, num_groups=4, topk_groups=2,
                                 expert_bias=True, dropless=True), True),
}
FIELDS = ("ids_TK", "weights_TK", "kept_TK", "slots_TK", "counts_E", "num_dropped", "aux_loss",
          "z_loss", "loss")


def _same_routing(a, b):
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for field in ("row_TK", "token_N", "ends_E"):
        assert torch.equal(getattr(a.order, field), getattr(b.order, field)), field


def _fused(x, w, cfg, bias):
    ticket = route_tickets(x.device)
    out, logits = route_decode_fused(x, w, cfg, bias, ticket)
    assert not ticket.any()  # left ready for the next launch
    return out, logits


def _bias(E, has_bias):
    if not has_bias:
        return None
    return (torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.05).to(DEVICE)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,D,E", [(1, 40, 16), (16, 72, 16), (37, 24, 128)])
def test_exact_sums_give_the_unfused_routing_bit_for_bit(name, T, D, E):
    """Operands that are multiples of 1/8 below 1: every product and partial sum is exact in
    fp32, so the logits equal router_logits' bit for bit whatever the order, and so must every
    routing field. (37, 24, 128): 10 token blocks × 2 expert blocks of logits tiles; (16, 72):
    D not a multiple of the tile."""
    cfg, has_bias = CONFIGS[name]
    g = torch.Generator().manual_seed(T * 100 + E)
    x = (torch.randint(-7, 8, (T, D), generator=g) / 8).to(DEVICE)
    w = (torch.randint(-7, 8, (E, D), generator=g) / 8).to(DEVICE)
    bias = _bias(E, has_bias)
    out, logits = _fused(x, w, cfg, bias)
    ref_logits = router_logits(x, w)
    assert torch.equal(logits, ref_logits)
    _same_routing(out, route_decode_triton(ref_logits, cfg, bias))


@pytest.mark.parametrize("name", ["qwen3_top8", "top1_deepspeed"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)])
def test_random_logits_match_router_logits(name, dtypes):
    """Random operands: logits to fp32 rounding of the sum (bf16 operands: exact products),
    the same choices as routing router_logits, and routing equal to the unfused kernel's on the
    fused logits bit for bit."""
    cfg, _ = CONFIGS[name]
    T, D, E = 21, 96, 64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtypes[0])
    w = (torch.randn(E, D, generator=g) * D ** -0.5).to(DEVICE, dtypes[1])
    out, logits = _fused(x, w, cfg, None)
    ref_logits = router_logits(x, w)
    # |error| ≤ D·eps·Σ|x·w| for any summation order; relative to the magnitudes summed.
    scale = x.float().abs() @ w.float().abs().t()
    assert ((logits - ref_logits).abs() <= 1e-6 * scale).all()
    assert torch.equal(out.ids_TK, route_decode_triton(ref_logits, cfg, None).ids_TK)
    _same_routing(out, route_decode_triton(logits, cfg, None))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf, NaN
def test_non_finite_inputs_are_made_finite_like_router_logits():
    cfg, _ = CONFIGS["qwen3_top8"]
    T, D, E = 6, 32, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(E, D, generator=g)
    w[:, 5] = w[:, 5].abs() + 0.1  # column 5 positive: an inf there gives ±inf logits, no NaN
    x[1, 5] = float("inf")
    x[2, 5] = float("-inf")
    x[3, 0] = float("nan")
    x[4, 5], x[4, 6] = float("inf"), float("-inf")  # inf - inf: NaN logits where w has both signs
    x, w = x.to(DEVICE), w.to(DEVICE)
    out, logits = _fused(x, w, cfg, None)
    ref_logits = router_logits(x, w)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[1:5], ref_logits[1:5])
    _same_routing(out, route_decode_triton(logits, cfg, None))


def test_too_few_tickets_are_refused_in_one_line():
    x = torch.zeros(16, 32, device=DEVICE)
    w = torch.zeros(16, 32, device=DEVICE)
    cfg = CONFIGS["qwen3_top8"][0]
    with pytest.raises(ValueError, match="tickets must be int32 with 5 counters for 16 tokens"):
        route_decode_fused(x, w, cfg, None, torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_tiles_spread_the_gate_over_programs():
    # Qwen3-30B-A3B's gate (D 2048, 128 experts, bf16): 2 experts per program, 64 programs;
    # with more token blocks more experts per program, so that the grid stays one wave of at
    # most 128 programs (16 tokens: 32 × 4, not 64 × 4); all of D in one chunk up to 16 tokens.
    assert logits_tiles(1, 2048, 128, 2) == (2, 2, 2048)
    assert logits_tiles(8, 2048, 128, 2) == (4, 2, 2048)
    assert logits_tiles(16, 2048, 128, 2) == (4, 4, 2048)
    assert logits_tiles(32, 2048, 128, 2) == (4, 8, 1024)
    # Mixtral (D 4096, 8 experts): 2 experts per program; a tiny gate: one program.
    assert logits_tiles(1, 4096, 8, 2)[1] == 2
    assert logits_tiles(1, 64, 16, 4)[1] == 16
    # With the add + norm inside (whole_rows) the warps must give tiles holding all of D:
    # 16 tokens of Qwen3-30B-A3B take 8 (4 split D), 1 and 8 tokens keep theirs, and 32
    # tokens split D on any warps (the norm then runs first).
    assert (route_warps(16, 2048, 128), route_warps(16, 2048, 128, whole_rows=True)) == (4, 8)
    assert logits_tiles(16, 2048, 128, 2, 8)[2] == 2048
    for T in (1, 8):
        assert route_warps(T, 2048, 128, whole_rows=True) == route_warps(T, 2048, 128)
    assert route_warps(32, 2048, 128, whole_rows=True) == 8
    assert logits_tiles(32, 2048, 128, 2, 8)[2] < 2048


def test_router_takes_the_fused_kernel_only_where_it_applies():
    torch.manual_seed(0)
    cfg = RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1)
    router = Router(16, 8, cfg, Backends(router="triton_decode_fused")).to(DEVICE)
    unfused = Router(16, 8, cfg, Backends(router="triton_decode")).to(DEVICE)
    unfused.load_state_dict(router.state_dict())
    x = torch.randn(6, 16, device=DEVICE)
    with torch.no_grad():
        out = router(x, inference=True)
        ref = unfused(x, inference=True)
        assert out.order is not None and torch.equal(out.ids_TK, ref.ids_TK)
        torch.testing.assert_close(out.weights_TK, ref.weights_TK, rtol=1e-6, atol=1e-7)
        assert torch.equal(out.order.token_N, ref.order.token_N)
        assert router(x, inference=True).order is not None  # the ticket was left at 0
        router.train()
        trained = router(x)  # a capacity dropping in position order: the one launch too
        assert trained.order is not None and trained.capacity is not None
        rts_cfg = RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1,
                               drop_policy="random")
        rts = Router(16, 8, rts_cfg, Backends(router="triton_decode_fused")).to(DEVICE)(x)
        assert rts.order is None and rts.capacity is not None  # RTS: the multi-kernel router
    # With a gradient the logits are torch's (the fused launch has no backward) and the routing
    # the one launch, dropless as served and with the capacity in training.
    assert router(x, inference=True).order is not None
    assert router(x).order is not None


def _layer(router):
    D, F, E = (512, 256, 64) if ON_GPU else (32, 16, 16)
    torch.manual_seed(0)
    spec = FFNSpec(kind="moe", d_ff=F, num_experts=E, expert_d_ff=F, router=router)
    layer = MoELayer(spec, D, "swiglu", bias=False).to(DEVICE)
    for p in layer.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(0, 0.05)
    return layer, D


@pytest.mark.parametrize("name", ["qwen3_top8", "deepseek_v3"])
@pytest.mark.parametrize("T", [1, 16])
def test_fused_decode_layer_equals_reference(name, T):
    layer, D = _layer(CONFIGS[name][0])
    x = torch.randn(1, T, D, device=DEVICE)
    with torch.no_grad():
        set_backends(layer, Backends.reference())
        y_ref, r_ref = layer(x, inference=True)
        set_backends(layer, Backends(router="triton_decode", dispatch="triton",
                                     experts="stream"))
        y_unfused, r_unfused = layer(x, inference=True)
        set_backends(layer, Backends(router="triton_decode_fused", dispatch="triton",
                                     experts="stream"))
        y, r = layer(x, inference=True)
    assert r.order is not None and torch.equal(r.ids_TK, r_ref.ids_TK)
    # At most 16 tokens the router leaves the rows to the experts' stream kernel, which
    # writes what the router's pass 2 would have (the unfused router placed them itself).
    # (The weights agree to the logits' fp32 rounding only: compare the placement.)
    assert not r.order.placed and r_unfused.order.placed
    assert torch.equal(r.slots_TK, r_unfused.slots_TK)
    for field in ("row_TK", "token_N", "ends_E"):
        assert torch.equal(getattr(r.order, field), getattr(r_unfused.order, field)), field

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    # On the GPU the stream kernels' fp32 tl.dot runs in TF32 (~1e-3 from the fp32 reference);
    # the same kernels behind the unfused decode router must agree to the logits' fp32 rounding.
    assert rel(y, y_ref) < (5e-3 if ON_GPU else 1e-5)
    assert rel(y, y_unfused) < 1e-5


def test_experts_place_the_rows_the_router_leaves():
    """route_decode_fused(place_rows=False) then the one-launch stream kernel with the
    placement: the same outputs, slots, rows and token list as the router placing them;
    refused in one line where the experts cannot place (a capacity, more than 16 tokens)."""
    from moeflow.ops.grouped_mlp_triton import expert_mlp_stream, stream_counters
    cfg = CONFIGS["qwen3_top8"][0]
    T, D, F, E = 16, 32, 16, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g).to(DEVICE)
    gate = (torch.randn(E, D, generator=g) * 0.3).to(DEVICE)
    w_in = (torch.randn(E, D, 2 * F, generator=g) * D ** -0.5).to(DEVICE)
    w_out = (torch.randn(E, F, D, generator=g) * F ** -0.5).to(DEVICE)
    placed, _ = _fused(x, gate, cfg, None)
    left, _ = route_decode_fused(x, gate, cfg, None, route_tickets(x.device), place_rows=False)
    assert placed.order.placed and not left.order.placed
    assert torch.equal(left.order.ends_E, placed.order.ends_E)
    counters = stream_counters(E, x.device)
    y_placed = expert_mlp_stream(x, placed.order.ends_E, w_in, None, w_out, None, "swiglu",
                                 False, rows_N=placed.order.token_N, counters=counters)
    y_left = expert_mlp_stream(x, left.order.ends_E, w_in, None, w_out, None, "swiglu", False,
                               rows_N=left.order.token_N, counters=counters,
                               placement=(left.ids_TK, left.slots_TK, left.order.row_TK))
    assert not counters.any()
    _same_routing(left, placed)
    assert torch.equal(y_left[:T * cfg.top_k], y_placed[:T * cfg.top_k])
    with pytest.raises(ValueError, match="only dropless and for at most 16 tokens") as err:
        route_decode_fused(x, gate, cfg, None, route_tickets(x.device), capacity=4,
                           place_rows=False)
    assert "\n" not in str(err.value)
    x17 = torch.randn(17, D, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="got 17 tokens"):
        route_decode_fused(x17, gate, cfg, None, route_tickets(x.device), place_rows=False)
    with pytest.raises(ValueError, match="needs the counters"):
        expert_mlp_stream(x, left.order.ends_E, w_in, None, w_out, None, "swiglu", False,
                          rows_N=left.order.token_N,
                          placement=(left.ids_TK, left.slots_TK, left.order.row_TK))


def test_rows_stay_with_the_router_unless_the_experts_stream():
    """The router leaves the rows only to a layer whose experts run the stream kernel behind the
    Triton dispatch; a dispatcher that cannot hand them over refuses an unplaced routing in one
    line instead of sorting unwritten slots."""
    from moeflow.model.dispatch import LocalDispatcher
    layer, D = _layer(CONFIGS["qwen3_top8"][0])
    x = torch.randn(1, 4, D, device=DEVICE)
    with torch.no_grad():
        set_backends(layer, Backends(router="triton_decode_fused", dispatch="triton",
                                     experts="reference"))
        _, r = layer(x, inference=True)
        assert r.order.placed
        set_backends(layer, Backends(router="triton_decode_fused", dispatch="triton",
                                     experts="stream"))
        _, r = layer(x, inference=True)
        assert not r.order.placed
        unplaced = layer.router(x[0], inference=True, experts_place=True)
        assert not unplaced.order.placed
        for dispatcher in (LocalDispatcher(Backends(dispatch="triton")),
                           LocalDispatcher(Backends(dispatch="reference"), defer_gather=True)):
            with pytest.raises(ValueError, match="left its rows") as err:
                dispatcher.dispatch(x[0], unplaced)
            assert "\n" not in str(err.value)


@pytest.mark.skipif(not ON_GPU, reason="kernel launches are counted on CUDA")
@pytest.mark.parametrize("T", [1, 16])
def test_fused_decode_layer_launches_three_kernels(T):
    """Issue 14: route + plan with the logits, the experts (up and down in one launch),
    combine; nothing else."""
    layer, D = _layer(CONFIGS["qwen3_top8"][0])
    layer = layer.bfloat16()
    set_backends(layer, Backends(router="triton_decode_fused"))
    x = torch.randn(1, T, D, device=DEVICE, dtype=torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        for _ in range(2):  # compile, autotune the stream kernels, zero the router's ticket
            layer(x, inference=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            layer(x, inference=True)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sorted(names) == sorted(["_decode_route_logits_kernel", "_moe_stream_kernel",
                                    "_sum_rows_kernel"]), names


@pytest.mark.parametrize("T,D", [(1, 48), (9, 40), (3, 4096), (3, 8192)])
def test_pending_add_norm_is_computed_by_the_router_kernel(T, D, monkeypatch):
    """route_decode_fused with the add + RMSNorm ahead of it pending: its programs compute s
    and y themselves where D fits one logits tile ((3, 4096) on 8 warps, where the router's
    4 split it; (3, 8192) on none, so the norm's own pass runs first), and the result is the
    norm kernel's s and y followed by the router on y: s equal, y to the sum of squares'
    order, the same routing."""
    from moeflow.ops.norm_triton import PendingAddNorm, add_rms_norm_triton

    cfg, _ = CONFIGS["qwen3_top8"]
    E = 16
    g = torch.Generator().manual_seed(T * 10 + D)
    x, h = (torch.randn(T, D, generator=g).to(DEVICE) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE)
    gate = (torch.randn(E, D, generator=g) * D ** -0.5).to(DEVICE)
    s_ref, y_ref = add_rms_norm_triton(x, h, weight, 1e-6)
    out_ref, logits_ref = _fused(y_ref, gate, cfg, None)
    pending = PendingAddNorm.of(x, h, weight, 1e-6)
    runs = []
    run = PendingAddNorm.run
    monkeypatch.setattr(PendingAddNorm, "run", lambda self: runs.append(1) or run(self))
    out, logits = route_decode_fused(pending, gate, cfg, None, route_tickets(x.device))
    assert len(runs) == (1 if D == 8192 else 0)  # in-kernel wherever all of D is one tile
    assert torch.equal(pending.s, s_ref)
    torch.testing.assert_close(pending.y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.ids_TK, out_ref.ids_TK)


@pytest.mark.parametrize("T", [1, 4])
def test_decode_model_leaves_the_norm_before_each_moe_layer_to_its_router(T, monkeypatch):
    """A Qwen3-like model decoding through the one-launch router: the add + norm after each
    attention runs inside the router's kernel (no norm launch of its own), and the logits
    equal those of the same model run block by block (a forward hook on a block: every norm
    its own launch) to the sum of squares' order (on a GPU the fp32 tl.dot run in TF32,
    which rounds that difference up to 2^-11)."""
    from moeflow import ModelConfig, Transformer
    from moeflow.ops import norm_triton

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                      n_kv_heads=2, head_dim=8, max_seq_len=16, qk_norm=True,
                      moe_kind="moe", moe_every=1, num_experts=8, expert_d_ff=16,
                      router=RouterConfig(top_k=2, dropless=True))
    model = Transformer(cfg, backends=Backends(
        fuse="reference", elementwise="triton", dispatch="triton", experts="stream",
        router="triton_decode_fused")).to(DEVICE).eval()
    ids = torch.randint(0, 64, (1, T), device=DEVICE)
    launches = []
    launch = norm_triton._launch
    monkeypatch.setattr(norm_triton, "_launch",
                        lambda *a, **k: launches.append(1) or launch(*a, **k))
    with torch.no_grad():
        got = model(ids, inference=True).logits
        fused = len(launches)
        hook = model.blocks[0].register_forward_hook(lambda *a: None)
        want = model(ids, inference=True).logits
        hook.remove()
    assert fused == cfg.n_layers + 1  # each block's first norm and the final norm
    assert len(launches) - fused == 2 * cfg.n_layers + 1
    tol = 5e-3 if ON_GPU else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
