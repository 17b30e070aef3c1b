"""FP8 training matmuls (moeflow.ops.fp8_linear, moeflow.ops.fp8_grouped, Backends.matmul).

The numerics are pinned two ways: against the recipe computed independently here (each operand
rounded to e4m3 with a power-of-two scale per slice along the GEMM's contraction axis, the
product in fp64), to fp32-accumulation rounding; and against the exact fp64 product, within the
bound e4m3's 3 mantissa bits give (relative 2^-4 per operand element, 2^-10 of the scale's unit
in the subnormal range). The real kernels (torch._scaled_mm, torch._scaled_grouped_mm) are
compared with the reference: torch._scaled_mm also on the CPU, the grouped kernel on CUDA only.
A model with Backends(matmul="fp8_reference") trains close to the plain one, keeps its
parameters and state_dict keys, and infers exactly as the plain model without autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moeflow import Backends, ModelConfig, RouterConfig, Transformer
from moeflow.config import MLAConfig
from moeflow.model import linear as linear_mod
from moeflow.ops import backend
from moeflow.ops.expert_mlp import expert_mlp_fp8
from moeflow.ops.fp8_grouped import fp8_grouped_mm
from moeflow.ops.fp8_linear import FP8, fp8_linear, pow2_scales, quantize_rows
from moeflow.train import TrainConfig

from _train_small import assert_follows, train_variants

U = 2.0 ** -4  # e4m3's unit roundoff: 3 mantissa bits, round to nearest
SUBNORMAL_ERR = 2.0 ** -10  # half the spacing of e4m3's subnormals (2^-9), in scaled units
FP32_U, BF16_U = 2.0 ** -24, 2.0 ** -8
ON_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")


def varied(*shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random values whose rows and columns differ in magnitude by orders (what one scale per
    row or per column must absorb), with a zero row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = t * 10.0 ** torch.empty(shape[0], 1).uniform_(-3, 2, generator=g).double()
    t = t * 10.0 ** torch.empty(1, shape[1]).uniform_(-1, 1, generator=g).double()
    t[shape[0] // 2] = 0
    return t.to(dtype).to(device)


def recipe(t: torch.Tensor, dim: int) -> torch.Tensor:
    """fp64 values of `t` as the recipe rounds them: one power-of-two scale per slice along
    `dim` (the contraction axis), the largest with amax·scale <= 448, then e4m3."""
    t = t.double()
    amax = t.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, 2.0 ** torch.floor(torch.log2(448.0 / amax)), 1.0)
    return (t * scale).to(FP8).double() / scale


def e4m3_error(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-element bound on |recipe(t) - t|: 2^-4 relative, or 2^-10 of the scale's unit in the
    subnormal range (the scale is at least 224/amax, so that unit is at most amax/224)."""
    t = t.double()
    return U * t.abs() + SUBNORMAL_ERR * t.abs().amax(dim=dim, keepdim=True) / 224


# The accumulation error of torch's FP8 kernels on Hopper, per unit of Σ|products|. Hopper's
# FP8 tensor-core MMA keeps about 14 bits of its running sum between the promotions to fp32
# (DeepSeek-V3, section 3.3.2, measured on the H800), so these kernels are not fp32-accumulation
# exact: on the H200 with torch 2.11 (rowwise CUTLASS kernels, not fast-accum) the two CUDA tests
# below were off by up to 2.7e-4 (2^-11.9) of Σ|products| at contractions of 256-512
# (2026-12-02). The bound is 4x that; a wrong scale or layout is off by O(|result|), and the
# varied operands keep |result| above it for most entries.
HOPPER_FP8_ACC = 2.0 ** -10


def assert_recipe(got, a, b, out_u, acc_u=None):
    """`got` = a·bᵀ (a [M, K], b [N, K]: K contracted) of the recipe's operands, to the
    accumulation's rounding (acc_u of the sum of |products|; default fp32's, K·2^-24) and the
    output's rounding (out_u)."""
    qa, qb = recipe(a, 1), recipe(b, 1)
    want = qa @ qb.t()
    acc_u = a.shape[1] * FP32_U if acc_u is None else acc_u
    acc = acc_u * (qa.abs() @ qb.abs().t())
    tol = acc * (1 + out_u) + out_u * want.abs()
    excess = ((got.double() - want).abs() - tol).max().item()
    assert excess <= 0, f"exceeds the recipe's accumulation and output rounding by {excess}"


def assert_format_bound(got, a, b, out_u, acc_u=None):
    """`got` within e4m3's bound of the exact a·bᵀ: Σ|Δa||b'| + |a||Δb|, plus the accumulation
    (as assert_recipe) and the output's rounding of the quantized product."""
    a64, b64 = a.double(), b.double()
    ea, eb = e4m3_error(a, 1), e4m3_error(b, 1)
    exact = a64 @ b64.t()
    quantized_abs = (a64.abs() + ea) @ (b64.abs() + eb).t()
    acc_u = a.shape[1] * FP32_U if acc_u is None else acc_u
    bound = (ea @ (b64.abs() + eb).t() + a64.abs() @ eb.t()
             + (acc_u + out_u) * 2 * quantized_abs)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


# ---- quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_round_trip_within_e4m3_precision(dtype):
    t = varied(64, 96, seed=1, dtype=dtype)
    q, inv = quantize_rows(t)
    assert q.dtype == FP8 and q.is_contiguous() and inv.shape == (64, 1)
    mantissa, _ = torch.frexp(inv)
    assert (mantissa == 0.5).all()  # powers of two
    amax = t.float().abs().amax(1, keepdim=True)
    live = amax[:, 0] > 0
    assert (amax / inv <= 448)[live].all() and (2 * amax / inv > 448)[live].all()  # the largest
    back = q.float() * inv
    assert (back[~live] == 0).all()
    err = (back.double() - t.double()).abs()
    assert (err <= e4m3_error(t, 1)).all()
    assert err.max() > 0
    # the per-element relative bound where the scaled value is a normal e4m3 number
    normal = t.float().abs() / inv >= 2.0 ** -6
    assert (err[normal] <= U * t.double().abs()[normal]).all()


def test_scales_are_exact_powers_of_two_at_the_edges():
    amax = torch.tensor([0.0, 448.0, 448.0 * (1 + 2 ** -20), 224.0, 1e-45, 3e38, 0.875, 0.8751])
    scale, inverse = pow2_scales(amax)
    assert (scale * inverse == 1).all() and (torch.frexp(scale)[0] == 0.5).all()
    assert scale.tolist()[:4] == [512.0, 1.0, 0.5, 2.0]
    assert scale[6] == 512 and scale[7] == 256  # 0.875·512 = 448 fits, 0.8751·512 does not
    assert (amax * scale <= 448).all() and torch.isfinite(inverse).all()


# ---- the dense linear -------------------------------------------------------------------------

def linear_case(dtype, device="cpu", M=48, K=64, N=32, seed=0):
    x = varied(M, K, seed=seed, dtype=dtype, device=device).requires_grad_()
    w = varied(N, K, seed=seed + 1, dtype=dtype, device=device).requires_grad_()
    dy = varied(M, N, seed=seed + 2, dtype=dtype, device=device)
    return x, w, dy


def linear_gemms(x, w, dy, y, dx, dw):
    """(result, a, b) of the three GEMMs in a·bᵀ form: y = x·wᵀ, dx = dy·(wᵀ)ᵀ, dw = dyᵀ·(xᵀ)ᵀ."""
    return ((y, x, w), (dx, dy, w.t()), (dw, dy.t(), x.t()))


def run_linear(x, w, dy, kernel):
    y = fp8_linear(x, w, kernel=kernel)
    y.backward(dy)
    out = y.detach(), x.grad, w.grad
    x.grad = w.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_and_backward_follow_the_recipe(dtype):
    """Forward scales x per token and w per output feature; dX scales dy per token and w per
    input feature; dW scales dy per output feature and x per input feature (the GEMM's
    contraction axis each time): equal to that recipe to fp32 accumulation, and within e4m3's
    bound of the exact products."""
    x, w, dy = linear_case(dtype)
    y, dx, dw = run_linear(x, w, dy, kernel=False)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    out_u = BF16_U if dtype == torch.bfloat16 else FP32_U
    for got, a, b in linear_gemms(x.detach(), w.detach(), dy, y, dx, dw):
        assert_recipe(got, a, b, out_u)
        assert_format_bound(got, a, b, out_u)
        assert (got.double() != a.double() @ b.double().t()).any()  # quantized
    # the test tells the axes apart: w scaled per input feature gives another forward
    x, w = x.detach(), w.detach()
    assert not torch.allclose(recipe(x, 1) @ recipe(w, 0).t(), recipe(x, 1) @ recipe(w, 1).t())


def cpu_scaled_mm_takes_rowwise_scales() -> bool:
    """torch 2.13's CPU _scaled_mm takes one scale per row; 2.11's (the GPU image's) only one
    per tensor (an internal assert)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    q = torch.ones(16, 16).to(FP8)
    try:
        torch._scaled_mm(q, q.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not cpu_scaled_mm_takes_rowwise_scales(),
                    reason="this torch's CPU _scaled_mm takes no rowwise scales")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_kernel_matches_the_reference_on_cpu(dtype):
    """torch._scaled_mm runs rowwise scales on the CPU build too: the same results as the
    reference to fp32-accumulation rounding, forward and backward."""
    x, w, dy = linear_case(dtype, seed=3)
    out_u = BF16_U if dtype == torch.bfloat16 else FP32_U
    got = run_linear(x, w, dy, kernel=True)
    for g, a, b in linear_gemms(x.detach(), w.detach(), dy, *got):
        assert_recipe(g, a, b, out_u)


def test_fp8_linear_under_autocast_runs_in_the_autocast_dtype():
    x, w, dy = linear_case(torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w, kernel=False)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert x.grad.dtype == w.grad.dtype == torch.float32  # back to the fp32 master tensors
    assert_recipe(y, x.detach().bfloat16(), w.detach().bfloat16(), BF16_U)


# ---- the grouped experts ----------------------------------------------------------------------

def grouped_case(dtype=torch.float32, device="cpu", counts=(5, 0, 23, 1, 9), parked=3,
                 K=32, J=48, seed=0):
    """Expert-sorted rows; the first expert's x and dy rows 2^-20 times the others', so that a
    scale taken over another expert's rows would push them into e4m3's subnormals. (A power-of-
    two scale does not change how a normal value rounds, so only range can tell scales apart.)"""
    counts = torch.tensor(counts)
    ends = torch.cumsum(counts, 0)
    N = int(ends[-1]) + parked
    quiet_N1 = torch.where(torch.arange(N)[:, None] < counts[0], 2.0 ** -20, 1.0).double()
    x = (varied(N, K, seed=seed, dtype=torch.float64) * quiet_N1).to(dtype).to(device)
    x.requires_grad_()
    w = torch.stack([varied(K, J, seed=seed + 1 + e, dtype=torch.float64)
                     for e in range(len(counts))])
    w = w.to(dtype).to(device).requires_grad_()
    dy = (varied(N, J, seed=seed + 9, dtype=torch.float64) * quiet_N1).to(dtype).to(device)
    return x, w, dy, ends.to(device)


def run_grouped(x, w, dy, ends, kernel):
    y = fp8_grouped_mm(x, w, offs=ends.to(torch.int32), kernel=kernel)
    y.backward(dy)
    out = y.detach(), x.grad, w.grad
    x.grad = w.grad = None
    return out


def assert_grouped_recipe(y, dx, dw, x, w, dy, ends, out_u, acc_u=None):
    """Each expert's rows against that expert's weights, as the dense recipe on its own rows
    (dW's scales are the expert's own: amax over its rows); an idle expert's dW is zero."""
    y, dx, dw, x, w, dy = (t.detach().cpu() for t in (y, dx, dw, x, w, dy))
    lo = 0
    for e, hi in enumerate(ends.tolist()):
        if hi == lo:
            assert (dw[e] == 0).all()
            continue
        rows = slice(lo, hi)
        assert_recipe(y[rows], x[rows], w[e].t(), out_u, acc_u)
        assert_recipe(dx[rows], dy[rows], w[e], out_u, acc_u)
        assert_recipe(dw[e].t(), dy[rows].t(), x[rows].t(), out_u, acc_u)
        assert_format_bound(dw[e].t(), dy[rows].t(), x[rows].t(), out_u, acc_u)
        lo = hi


def test_grouped_fp8_follows_the_recipe_per_expert():
    """Rows past the end never reach dW: changing them leaves it bit for bit."""
    x, w, dy, ends = grouped_case()
    y, dx, dw = run_grouped(x, w, dy, ends, kernel=False)
    assert_grouped_recipe(y, dx, dw, x, w, dy, ends, FP32_U)
    n = int(ends[-1])
    x2, dy2 = x.detach().clone(), dy.clone()
    x2[n:] *= 1e6
    dy2[n:] = -1e6
    assert torch.equal(run_grouped(x2.requires_grad_(), w, dy2, ends, False)[2], dw)


def fake_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                           out_dtype=None, use_fast_accum=False):
    """torch._scaled_grouped_mm's rowwise contract as its CUDA source states it (GroupedBlas.cpp,
    GroupMMCommon.cuh), emulated on the CPU to test how the op calls it: e4m3 operands, a
    row-major, b column-major, widths multiples of 16, int32 offsets, fp32 scales (2D×3D: [M]
    and [E, N]; 2D×2D: [E·M] and [E·N] expert-major, group sizes multiples of 16 but the last),
    bf16 output, rows past the last offset left unwritten (NaN here); no empty group in the 2D×2D
    form (sm100's kernel asserts that, sm90's would leave it unwritten)."""
    assert a.dtype == b.dtype == FP8 and out_dtype == torch.bfloat16 and not use_fast_accum
    assert bias is None and scale_result is None and offs.dtype == torch.int32
    assert a.stride(-1) == 1 and b.stride(-2) == 1 and b.stride(-1) >= b.shape[-2]
    assert a.shape[-1] % 16 == 0 and b.shape[-2] % 16 == 0 and b.shape[-1] % 16 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.is_contiguous()
    ends = [0] + offs.tolist()
    E = len(offs)
    if b.dim() == 3:
        assert scale_a.shape == (a.shape[0],) and scale_b.shape == (E, b.shape[2])
        out = torch.full((a.shape[0], b.shape[2]), float("nan"))
        for e in range(E):
            lo, hi = ends[e], ends[e + 1]
            out[lo:hi] = (a[lo:hi].float() * scale_a[lo:hi, None]) @ (b[e].float() * scale_b[e])
        return out.to(out_dtype)
    M, N = a.shape[0], b.shape[1]
    assert scale_a.shape == (E * M,) and scale_b.shape == (E * N,)
    out = torch.full((E, M, N), float("nan"))
    for e in range(E):
        lo, hi = ends[e], ends[e + 1]
        assert e == E - 1 or (hi - lo) % 16 == 0, "group size not a multiple of 16"
        assert hi > lo, "empty group"
        out[e] = ((a[:, lo:hi].float() * scale_a[e * M:(e + 1) * M, None])
                  @ (b[lo:hi].float() * scale_b[e * N:(e + 1) * N]))
    return out.to(out_dtype)


def test_grouped_kernel_path_calls_the_kernel_as_its_contract_says(monkeypatch):
    """The kernel path (operand layouts, scale shapes and order, dW's 16-aligned groups) on
    the CPU through an emulation of torch._scaled_grouped_mm's contract; the real kernel is
    compared on CUDA below."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fake_scaled_grouped_mm, raising=False)
    x, w, dy, ends = grouped_case(torch.bfloat16, counts=(5, 0, 23, 1, 9, 16), parked=3)
    y, dx, dw = run_grouped(x, w, dy, ends, kernel=True)
    assert_grouped_recipe(y, dx, dw, x, w, dy, ends, BF16_U)
    ref = run_grouped(x, w, dy, ends, kernel=False)
    n = int(ends[-1])
    assert torch.equal(y[:n], ref[0][:n]) and torch.equal(dx[:n], ref[1][:n])
    assert torch.equal(dw, ref[2])


def test_fp8_experts_equal_the_dense_fp8_recipe_per_expert():
    """expert_mlp_fp8 (grouped GEMMs, parked rows, biases, an empty expert) equals a loop of
    the dense FP8 linear over each expert's rows: the same quantization, forward and backward.
    Parked rows come out zero and get no gradient."""
    torch.manual_seed(0)
    counts, parked, D, F_, E = (7, 0, 12, 3), 4, 32, 16, 4
    ends = torch.cumsum(torch.tensor(counts), 0)
    n = int(ends[-1])
    x = torch.randn(n + parked, D, requires_grad=True)
    w_in = (torch.randn(E, D, 2 * F_) * D ** -0.5).requires_grad_()
    w_out = (torch.randn(E, F_, D) * F_ ** -0.5).requires_grad_()
    b_in = (torch.randn(E, 2 * F_) * 0.1).requires_grad_()
    b_out = (torch.randn(E, D) * 0.1).requires_grad_()
    params = (x, w_in, b_in, w_out, b_out)
    dy = torch.randn(n + parked, D)
    y = expert_mlp_fp8(x, ends, w_in, b_in, w_out, b_out, "swiglu", True, kernel=False)
    y.backward(dy)
    got = [y.detach()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    outs, lo = [], 0
    for e, hi in enumerate(ends.tolist()):
        if hi > lo:
            h = fp8_linear(x[lo:hi], w_in[e].t(), kernel=False) + b_in[e]
            g, u = h.chunk(2, dim=-1)
            outs.append(fp8_linear(F.silu(g) * u, w_out[e].t(), kernel=False) + b_out[e])
        lo = hi
    want_y = torch.cat(outs + [x.new_zeros(parked, D)])
    want_y.backward(dy)
    want = [want_y.detach()] + [p.grad for p in params]
    assert (got[0][n:] == 0).all() and (got[1][n:] == 0).all()
    assert (got[2][1] == 0).all() and (got[4][1] == 0).all()  # the empty expert
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt, rtol=1e-5, atol=1e-6)


# ---- GPU parity: the kernels against the reference (skipped without CUDA) ----------------------

@requires_cuda
def test_scaled_mm_kernel_matches_the_reference_on_cuda():
    x, w, dy = linear_case(torch.bfloat16, device="cuda", M=256, K=512, N=384, seed=5)
    assert backend.scaled_mm_supported(x, w)
    for kernel, acc_u in ((False, None), (True, HOPPER_FP8_ACC)):
        got = run_linear(x, w, dy, kernel=kernel)
        for g, a, b in linear_gemms(x.detach(), w.detach(), dy, *got):
            assert_recipe(g.cpu(), a.cpu(), b.cpu(), BF16_U, acc_u)


@requires_cuda
def test_scaled_grouped_mm_kernel_matches_the_reference_on_cuda():
    """Uneven counts (not multiples of 16: dW's kernel needs aligned groups, the op aligns
    them), an idle expert, parked rows."""
    x, w, dy, ends = grouped_case(torch.bfloat16, "cuda", counts=(37, 0, 130, 1, 64, 19),
                                  parked=5, K=256, J=384, seed=6)
    assert backend.scaled_grouped_mm_supported(x, w, w.transpose(1, 2))
    for kernel, acc_u in ((False, None), (True, HOPPER_FP8_ACC)):
        assert_grouped_recipe(*run_grouped(x, w, dy, ends, kernel=kernel), x, w, dy, ends,
                              BF16_U, acc_u)


@requires_cuda
def test_fp8_experts_kernel_matches_the_reference_on_cuda():
    torch.manual_seed(7)
    counts, D, F_ = (40, 0, 77, 3, 16), 256, 128
    E = len(counts)
    ends = torch.cumsum(torch.tensor(counts), 0).cuda()
    n = int(ends[-1])
    mk = lambda *s: (torch.randn(*s, device="cuda") * s[-2] ** -0.5).bfloat16()  # noqa: E731
    x = torch.randn(n + 6, D, device="cuda").bfloat16().requires_grad_()
    w_in, w_out = mk(E, D, 2 * F_).requires_grad_(), mk(E, F_, D).requires_grad_()
    dy = torch.randn(n + 6, D, device="cuda").bfloat16()
    results = []
    for kernel in (False, True):
        y = expert_mlp_fp8(x, ends, w_in, None, w_out, None, "swiglu", True, kernel=kernel)
        y.backward(dy)
        results.append([y.detach(), x.grad, w_in.grad, w_out.grad])
        x.grad = w_in.grad = w_out.grad = None
    for r, g in zip(*results):
        rel = ((g.float() - r.float()).norm() / r.float().norm()).item()
        assert rel < 4 * BF16_U, rel  # bf16 roundings of the intermediates, reordered sums
    assert (results[1][0][n:] == 0).all() and (results[1][1][n:] == 0).all()


# ---- Backends, models and training ------------------------------------------------------------

def test_backends_matmul_field_is_validated():
    with pytest.raises(ValueError, match=r"^matmul='fp16': must be one of auto, reference, fp8"):
        Backends(matmul="fp16")
    with pytest.raises(ValueError, match=r"^experts='grouped_mm': cannot be chosen with "
                                         r"matmul='fp8'"):
        Backends(matmul="fp8", experts="grouped_mm")
    assert Backends.reference().matmul == "reference" and not Backends.reference().fp8
    assert Backends(matmul="fp8_reference").fp8 and not Backends().fp8
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, 16)
    assert backend.resolve_linear_backend("fp8", x, w) == "fp8_reference"  # no kernel on CPU
    with torch.no_grad():
        assert backend.resolve_linear_backend("fp8", x, w) == "reference"  # inference: plain
    assert backend.resolve_linear_backend("auto", x, w) == "reference"


def llama(**kw) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                       n_kv_heads=2, max_seq_len=16, moe_every=1, first_moe_layer=1,
                       num_experts=4, expert_d_ff=16, num_shared_experts=1,
                       router=RouterConfig(top_k=2, dropless=True), **kw)


def train_steps(model, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
        o = model(ids[:, :-1])
        loss = F.cross_entropy(o.logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss + o.router_loss).backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


GPT = ModelConfig(arch="gpt", vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=16,
                  moe_kind="residual_moe", moe_every=2, num_experts=4,
                  router=RouterConfig(top_k=1, min_capacity=2))


@pytest.mark.parametrize("cfg", [llama(), GPT, llama(mla=MLAConfig(
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))],
    ids=["llama-shared", "gpt-residual", "mla"])
def test_fp8_model_trains_like_the_plain_model(cfg, monkeypatch):
    """The FP8 linears are the attention and MLP projections (dense, shared, residual), never
    the LM head or a gate; a few AdamW steps follow the plain run's losses; parameters and
    state_dict are the plain model's; without autograd the FP8 model infers bit for bit as the
    plain one."""
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fp8 = Transformer(cfg, Backends(matmul="fp8_reference"))
    fp8.load_state_dict(plain.state_dict())
    sd_plain, sd_fp8 = plain.state_dict(), fp8.state_dict()
    assert list(sd_plain) == list(sd_fp8)
    assert all(sd_plain[k].dtype == sd_fp8[k].dtype and sd_plain[k].shape == sd_fp8[k].shape
               for k in sd_plain)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, fp8(ids).logits)

    seen = []
    real = linear_mod.fp8_linear
    monkeypatch.setattr(linear_mod, "fp8_linear",
                        lambda x, w, kernel: seen.append(w) or real(x, w, kernel))
    fp8(ids).logits.sum().backward()
    names = {id(p): n for n, p in fp8.named_parameters()}
    fp8_names = {names[id(w)] for w in seen}
    want = {n for n in names.values()
            if n.endswith(("attn.qkv.weight", "_proj.weight", "attn.proj.weight",
                           "fc_in.weight", "fc_out.weight"))}
    assert fp8_names == want and not any("lm_head" in n or "gate" in n for n in fp8_names)
    monkeypatch.undo()
    fp8.zero_grad()

    fp8.load_state_dict(plain.state_dict())
    losses_plain, losses_fp8 = train_steps(plain), train_steps(fp8)
    assert losses_plain != losses_fp8  # FP8 did run
    # e4m3 rounds each operand by up to 2^-4; over a few steps the loss moves by far less
    for a, b in zip(losses_plain, losses_fp8):
        assert abs(a - b) < 0.01 * a


def test_fp8_inference_is_untouched(monkeypatch):
    """No autograd (eval, generation, serving): not one FP8 call, whatever the field says."""
    calls = []
    for mod, name in ((linear_mod, "fp8_linear"), (backend, "expert_mlp_fp8")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=real, **k: calls.append(1) or _f(*a, **k))
    model = Transformer(llama(), Backends(matmul="fp8")).eval()
    with torch.inference_mode():
        model(torch.randint(0, 64, (2, 8)), inference=True)
    assert calls == []
    model(torch.randint(0, 64, (2, 8))).logits.sum().backward()
    assert len(calls) > 0


def test_train_with_fp8_follows_the_plain_run(tmp_path, corpus, config):
    runs = train_variants(tmp_path, config, corpus, 4, plain=(), fp8=("--fp8",))
    assert runs["fp8"] != runs["plain"]
    assert_follows(runs["fp8"], runs["plain"], rel=0.01)
    assert TrainConfig.load(tmp_path / "fp8" / "run.json").fp8
    with pytest.raises(ValueError, match=r"^fp8=True: does nothing with --pregate"):
        TrainConfig(fp8=True, pregate=True, init=str(tmp_path))
    assert dataclasses.replace(TrainConfig(), fp8=True).fp8


def test_fp8_is_refused_on_gpus_without_fp8_tensor_cores(monkeypatch, tmp_path):
    """Below compute capability 8.9 the emulation would be slower than bf16: a one-line error
    before anything is read or written (the CPU runs the emulation: tests, studies)."""
    from moeflow.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "resolve_device", lambda self: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"^fp8: NVIDIA A100 \(compute capability 8\.0\) has "
                                         r"no FP8 tensor cores \(8\.9\+\)"):
        Trainer(TrainConfig(fp8=True, out=str(tmp_path / "run"))).prepare()
    assert not (tmp_path / "run").exists()
