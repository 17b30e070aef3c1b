"""Dispatch mapping table + gather and the weighted combine vs moeflow.model.dispatch's reference:
exact forward (plan, rows, combined output), backward to tolerance."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.config import RouterConfig  # noqa: E402
from moeflow.model.dispatch import LocalDispatcher  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.model.router import Router  # noqa: E402


def _run(dispatcher, x, routing, g_out, y_scale):
    x = x.detach().clone().requires_grad_(True)
    w = routing.weights_TK.detach().clone().requires_grad_(True)
    routing = routing.__class__(**{**routing.__dict__, "weights_TK": w})
    x_ND, plan = dispatcher.dispatch(x, routing)
    y_ND = x_ND * y_scale  # a stand-in expert that is linear per row
    out = dispatcher.combine(y_ND, plan, routing)
    out.backward(g_out)
    return x_ND.detach(), plan, out.detach(), x.grad, w.grad


# Triton's interpreter converts fp32→bf16 by truncation (the GPU rounds to nearest), so the
# bit-exact bf16 combine is checked on the GPU only.
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity_factor,dropless,k", [(0.5, False, 2), (1.0, True, 3),
                                                        (1.0, False, 1)])
def test_dispatch_combine_match_reference(dtype, capacity_factor, dropless, k):
    T, D, E = (2048, 1024, 64) if ON_GPU else (29, 24, 8)
    torch.manual_seed(0)
    router = Router(D, E, RouterConfig(top_k=k, capacity_factor=capacity_factor, min_capacity=1,
                                       dropless=dropless, drop_policy="random")).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        routing = router(x)
    g_out = torch.randn(T, D, device=DEVICE, dtype=dtype)
    y_scale = torch.randn(D, device=DEVICE, dtype=dtype)
    ref = _run(LocalDispatcher(Backends(dispatch="reference")), x, routing, g_out, y_scale)
    out = _run(LocalDispatcher(Backends(dispatch="triton")), x, routing, g_out, y_scale)
    assert torch.equal(out[1].token_N, ref[1].token_N)
    assert torch.equal(out[1].row_TK, ref[1].row_TK)
    # Each assignment has a row of its own (the packed layout whose combine backward skips
    # zeroing y's gradient).
    assert torch.equal(out[1].row_TK.flatten().sort().values, torch.arange(T * k, device=DEVICE))
    assert torch.equal(out[1].ends_E, ref[1].ends_E)
    assert torch.equal(out[0], ref[0])
    if dtype == torch.bfloat16:  # one rounding per weighted row, fp32 sum in k order: exact
        assert torch.equal(out[2], ref[2])
    else:  # fp32: the GPU fuses multiply and add (one rounding less than torch's mul then sum)
        torch.testing.assert_close(out[2], ref[2], rtol=1e-6, atol=1e-6)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], ref[3], **tol)
    if dtype == torch.bfloat16:
        # d weights = <g_out, y> over D: the reference rounds every product to bf16 first, the
        # kernel sums exact products in fp32, so single entries near zero differ by bf16 noise.
        rel = ((out[4] - ref[4]).float().norm() / ref[4].float().norm()).item()
        assert rel < 1e-2
    else:
        torch.testing.assert_close(out[4], ref[4], **tol)
    if not dropless and capacity_factor < 1:
        assert routing.num_dropped.item() > 0


@pytest.mark.parametrize("capacity_factor,dropless,k", [(0.5, False, 2), (1.0, True, 3)])
def test_plan_only_dispatch_equals_the_gathering_one(capacity_factor, dropless, k):
    """dispatch_plan_triton (inference: the experts gather) plans exactly what dispatch_triton
    plans, dropped rows included, and its rows are the gathered ones."""
    from moeflow.ops.permute_triton import dispatch_plan_triton, dispatch_triton
    T, D, E = (2048, 1024, 64) if ON_GPU else (29, 24, 8)
    torch.manual_seed(1)
    router = Router(D, E, RouterConfig(top_k=k, capacity_factor=capacity_factor, min_capacity=1,
                                       dropless=dropless)).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    with torch.no_grad():
        r = router(x)
        args = (x, r.ids_TK, r.slots_TK, r.kept_TK, r.counts_E, r.capacity is not None)
        x_ND, *plan = dispatch_triton(*args)
        row_TK, token_N, ends_E = dispatch_plan_triton(*args)
    assert (int(r.num_dropped) > 0) == (not dropless)
    for got, want in zip((row_TK, token_N, ends_E), plan):
        assert torch.equal(got, want)
    assert torch.equal(x[token_N], x_ND)


# (tokens, columns per program, num_warps), none dividing the tokens or D.
SUM_TILES = ([(8, 1024, 8), (1, 256, 2), (16, 2048, 16), (2, 512, 4)] if ON_GPU else
             [(8, 16, 2), (1, 64, 4), (16, 8, 1)])


def test_sum_rows_tiles_give_the_same_bits():
    """The combine's kernel with tiles that divide neither the tokens nor D writes the bits of
    the default tile and of the sum in k order of rows rounded to the row dtype after weighting
    (exact: bf16 on the GPU, fp32 through the interpreter, which fuses no multiply-add),
    weighted (the combine) and unweighted (the gather's backward), with dropped assignments.
    GPU: Qwen3-30B-A3B's top-8 of 2047 tokens."""
    from moeflow.ops.permute_triton import _sum_rows
    T, K, D = (2047, 8, 2048) if ON_GPU else (29, 3, 24)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    torch.manual_seed(3)
    y_ND = torch.randn(T * K, D, device=DEVICE).to(dtype)
    row_TK = torch.randperm(T * K, device=DEVICE).view(T, K)
    kept_TK = torch.rand(T, K, device=DEVICE) > 0.2
    w_TK = torch.rand(T, K, device=DEVICE)
    for weighted in (True, False):
        want = torch.zeros(T, D, device=DEVICE)
        for k in range(K):
            y_TD = y_ND[row_TK[:, k]] * kept_TK[:, k, None].to(dtype)
            want += (y_TD * w_TK[:, k, None].to(dtype) if weighted else y_TD).float()
        want = want.to(dtype)
        outs = []  # kept alive: a tile that skips a write must not find the last tile's output
        for tiles in [{}] + [dict(block_t=t, block_d=d, num_warps=w) for t, d, w in SUM_TILES]:
            outs.append(_sum_rows(y_ND, row_TK, kept_TK.view(torch.int8), w_TK, T, weighted,
                                  **tiles))
            assert torch.equal(outs[-1], want), (weighted, tiles)
    with pytest.raises(ValueError, match="block_d"):
        _sum_rows(y_ND, row_TK, kept_TK.view(torch.int8), w_TK, T, True, block_d=100)


def test_combine_backward_in_a_capacity_slot_layout():
    """The expert-parallel capacity layout (moeflow.parallel.dispatcher): rows are expert slots,
    one of them empty, and dropped assignments name kept ones' rows (their slots clamped), after
    them in the kernel's order. The combine's gradients equal plain torch's: the kept rows keep
    their gradients, and the empty slot's is zero."""
    from moeflow.ops.permute_triton import combine_triton

    torch.manual_seed(0)
    T, K, D, rows = 5, 2, 8, 8
    row_TK = torch.tensor([[0, 4], [1, 5], [2, 6], [7, 0], [6, 1]], device=DEVICE)
    kept_TK = torch.ones(T, K, dtype=torch.bool, device=DEVICE)
    kept_TK[3, 1] = kept_TK[4, 0] = kept_TK[4, 1] = False  # name rows 0, 6, 1; row 3 is empty
    y = torch.randn(rows, D, device=DEVICE, requires_grad=True)
    w = torch.rand(T, K, device=DEVICE, requires_grad=True)
    g = torch.randn(T, D, device=DEVICE)

    out = combine_triton(y, w, row_TK, kept_TK, packed=False)
    out.backward(g)
    got = (out.detach(), y.grad.clone(), w.grad.clone())
    y.grad, w.grad = None, None
    ref = (y[row_TK] * w.unsqueeze(2) * kept_TK.unsqueeze(2)).sum(1)
    ref.backward(g)
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], y.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], w.grad, rtol=1e-6, atol=1e-6)
    assert all(got[1][r].abs().sum() > 0 for r in (0, 1, 6)) and (got[1][3] == 0).all()
