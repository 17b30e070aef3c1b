"""The fused Triton quantization (moeflow.ops.fp8_quantize_triton) against plain-torch
quantize_rows, bit for bit: the e4m3 bytes and the inverse scales.

Without a GPU the kernels run in Triton's interpreter, on tiny shapes; on a GPU the same tests
compare with torch's CUDA quantize_rows, and two more check an 8192x2048 operand and that the
kernel path of the FP8 linear and grouped GEMM quantizes through the kernels. The edge rows: a
zero row, amaxes that are tiny, huge, subnormal, exactly 448·2^k or just above, scaled values
on e4m3's rounding midpoints (normal and subnormal), and rows holding inf or NaN."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.ops import backend  # noqa: E402
from moeflow.ops import fp8_linear as fp8_linear_mod  # noqa: E402
from moeflow.ops.fp8_grouped import fp8_grouped_mm  # noqa: E402
from moeflow.ops.fp8_linear import FP8, fp8_linear, quantize_rows  # noqa: E402
from moeflow.ops import fp8_quantize_triton  # noqa: E402
from moeflow.ops.fp8_quantize_triton import plan_splits, quantize_rows_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
INF, NAN = float("inf"), float("nan")

# Values v·scale as the cast sees them (a row whose amax is 448 has scale 1): e4m3 midpoints,
# which round to the even neighbour (1.0625 -> 1, 1.1875 -> 1.25, 17 -> 16, 19 -> 20, 232 ->
# 224, 432 -> 448), their neighbours, and the subnormal range below 2^-6, whose spacing is 2^-9
# (2^-10 -> 0, 3·2^-10 -> 2^-8, 5·2^-10 -> 2^-8, 15·2^-10 -> 2^-6, the smallest normal).
MIDPOINTS = [448.0, 1.0625, 1.1875, 17.0, 19.0, 232.0, 432.0, 1.0625 + 2 ** -7, 1.1875 - 2 ** -7,
             2.0 ** -6, 2.0 ** -10, 3 * 2.0 ** -10, 5 * 2.0 ** -10, 15 * 2.0 ** -10,
             2.0 ** -9, 2.0 ** -11, 2.0 ** -6 - 2.0 ** -11, 7 * 2.0 ** -10, 1.9375, 0.0]


def edge_rows(C: int, seed: int) -> torch.Tensor:
    """fp64 rows of width C >= len(MIDPOINTS), mixed signs, each with one kind of amax."""
    g = torch.Generator().manual_seed(seed)
    fill = lambda amax: amax * torch.rand(C, generator=g, dtype=torch.float64)  # noqa: E731
    mid = torch.tensor(MIDPOINTS + [0.0] * (C - len(MIDPOINTS)), dtype=torch.float64)
    rows = [fill(1.0),
            torch.zeros(C, dtype=torch.float64),
            fill(1e-30), fill(3e38),  # tiny, huge
            fill(1e-37), fill(1e-39),  # k clamped to 126: below 2^-118, below fp32's normals
            fill(448.0 * 2.0 ** -5), fill(448.0 * 2.0 ** 3)]
    rows[6][3], rows[7][C - 1] = 448.0 * 2.0 ** -5, 448.0 * 2.0 ** 3  # exactly 448·2^k
    above = fill(450.0)
    above[C // 2] = 450.0  # above 448: the next scale down
    rows.append(above)
    rows += [mid * 2.0 ** j for j in (-20, 0, 7)]
    t = torch.stack(rows)
    sign = torch.randint(0, 2, t.shape, generator=g, dtype=torch.float64) * 2 - 1
    return t * sign


def assert_bit_equal(t: torch.Tensor, **kw) -> None:
    q, inverse = quantize_rows_triton(t, **kw)
    want_q, want_inverse = quantize_rows(t)
    assert q.dtype == FP8 and q.is_contiguous() and q.shape == t.shape
    assert inverse.dtype == torch.float32 and inverse.shape == (t.shape[0], 1)
    got, want = q.view(torch.uint8), want_q.view(torch.uint8)
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} bytes differ, first at {mismatch[0].tolist()}"
    assert torch.equal(inverse, want_inverse)


def layout(t_RC: torch.Tensor, transposed: bool) -> torch.Tensor:
    """t as a contiguous [R, C] tensor, or as the transposed view of a contiguous [C, R] one."""
    if not transposed:
        return t_RC.contiguous()
    view = t_RC.t().contiguous().t()
    assert view.stride() == (1, t_RC.shape[0])
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_edge_rows_bit_equal(dtype, transposed):
    t = edge_rows(40, seed=1).to(dtype).to(DEVICE)
    assert (t != 0).any(1).sum() == t.shape[0] - 1  # bf16/fp32 kept every row but the zero one
    for splits in (None, 1, 3):
        assert_bit_equal(layout(t, transposed), splits=splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(37, 300), (5, 4097), (1, 1), (130, 3)])
def test_shapes_off_the_blocks_bit_equal(dtype, transposed, shape):
    """Rows and columns that are not multiples of the tiles; rows of different magnitudes."""
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    magnitude = 10.0 ** torch.empty(shape[0], 1).uniform_(-5, 5, generator=g)
    t = torch.randn(shape, generator=g) * magnitude
    t = layout(t.to(dtype).to(DEVICE), transposed)
    assert_bit_equal(t)
    if shape[1] > 1:
        assert_bit_equal(t, splits=2)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_inf_or_nan(dtype):
    """A NaN row keeps quantize_rows' scale (frexp's exponent of NaN is 0: 2^9) and its NaNs;
    an inf row gets 2^8, its values beyond 448 saturate. Where torch's own cast returns NaN for
    a finite overflow (torch <= 2.11), the kernels' saturation is the documented difference; the
    sign bit of a NaN is the platform's (compared without it)."""
    t = torch.tensor([[1.0, NAN, -3.0, 200.0, -NAN, 0.5],
                      [1.0, -INF, 2.0, -1.8, 3e38, 1.84375],
                      [INF, -INF, 1.0, 0.0, 1.0, -1.0]]).to(dtype).to(DEVICE)
    for splits in (None, 2):
        q, inverse = quantize_rows_triton(t, splits=splits)
        want_q, want_inverse = quantize_rows(t)
        assert torch.equal(inverse, want_inverse)
        assert inverse.flatten().tolist() == [2.0 ** -9, 2.0 ** -8, 2.0 ** -8]
        got, want = q.view(torch.uint8).cpu(), want_q.view(torch.uint8).cpu()
        nan_in = torch.isnan(t.cpu())
        overflow_nan = ((want & 0x7F) == 0x7F) & ~nan_in  # torch <= 2.11: NaN, not 448
        want = torch.where(overflow_nan, (want & 0x80) | 0x7E, want)
        got, want = torch.where(nan_in, got & 0x7F, got), torch.where(nan_in, want & 0x7F, want)
        assert torch.equal(got, want)
        assert (got[nan_in] == 0x7F).all() and got[1, 1] == 0xFE and got[1, 4] == 0x7E
        assert got[1, 5] == 0x7E  # 472 rounds onto 0x7f, NaN's code: saturated


def test_split_plan_covers_every_column_once():
    for rows, cols, block_r, block_c, splits in [(2048, 8192, 64, 128, None),
                                                 (8192, 2048, 2, 1024, None),
                                                 (37, 300, 64, 128, 7), (5, 4097, 2, 1024, 9)]:
        s, chunk = plan_splits(rows, cols, block_r, block_c, splits)
        assert chunk % block_c == 0 and (s - 1) * chunk < cols <= s * chunk
    assert plan_splits(8192, 2048, 2, 1024) == (1, 2048)  # enough row blocks: one launch
    assert plan_splits(2048, 8192, 64, 128) == (32, 256)  # 32 row blocks: 1024 programs


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="expected a 2-D operand, got shape"):
        quantize_rows_triton(torch.ones(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="expected bf16 or fp32, got torch.float16"):
        quantize_rows_triton(torch.ones(2, 3, device=DEVICE, dtype=torch.float16))


def test_reference_path_keeps_plain_torch(monkeypatch):
    """kernel=False never reaches the Triton kernels, on any device."""
    def refuse(t):
        raise AssertionError("the reference quantized with the Triton kernels")
    monkeypatch.setattr(fp8_quantize_triton, "quantize_rows_triton", refuse)
    x = torch.randn(32, 16, device=DEVICE, requires_grad=True)
    fp8_linear(x, torch.randn(16, 16, device=DEVICE), kernel=False).sum().backward()
    assert x.grad is not None


# ---- CUDA only ----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_operand_bit_equal_on_cuda(dtype):
    """An operand of the benchmark's size, rows orders of magnitude apart, and its transpose."""
    g = torch.Generator(device="cuda").manual_seed(3)
    t = torch.randn(8192, 2048, device="cuda", generator=g)
    t = (t * 10.0 ** torch.empty(8192, 1, device="cuda").uniform_(-4, 4, generator=g)).to(dtype)
    assert_bit_equal(t)
    assert_bit_equal(t.t())


def _counting(monkeypatch) -> list:
    calls = []
    kernel = fp8_quantize_triton.quantize_rows_triton

    def counted(t, **kw):
        calls.append((tuple(t.shape), t.stride()))
        return kernel(t, **kw)
    monkeypatch.setattr(fp8_quantize_triton, "quantize_rows_triton", counted)
    return calls


@requires_cuda
def test_kernel_path_quantizes_with_triton_on_cuda(monkeypatch):
    """fp8_linear(kernel=True) quantizes its six operands (three of them transposed views) with
    the kernels, and its results equal those of plain-torch quantization exactly."""
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(256, 512, device="cuda", generator=g).bfloat16().requires_grad_()
    w = torch.randn(384, 512, device="cuda", generator=g).bfloat16().requires_grad_()
    dy = torch.randn(256, 384, device="cuda", generator=g).bfloat16()
    if not backend.scaled_mm_supported(x, w):
        pytest.skip("torch._scaled_mm's rowwise kernel needs sm89+")
    assert fp8_linear_mod.fused_quantize_fits(w) and fp8_linear_mod.fused_quantize_fits(w.t())
    assert not fp8_linear_mod.fused_quantize_fits(w[::2, ::2])
    assert not fp8_linear_mod.fused_quantize_fits(w.half())
    results, calls = [], []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fp8_linear_mod, "fused_quantize_fits", lambda t: False)
        calls.append(_counting(monkeypatch))
        y = fp8_linear(x, w, kernel=True)
        y.backward(dy)
        results.append([y.detach(), x.grad, w.grad])
        x.grad = w.grad = None
    assert len(calls[0]) == 6 and len(calls[1]) == 0
    assert sum(stride[0] == 1 for _, stride in calls[0]) == 3  # dy.t(), w.t(), x.t()
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_cuda
def test_grouped_kernel_path_quantizes_with_triton_on_cuda(monkeypatch):
    """fp8_grouped_mm(kernel=True): the forward's and dX's operands (four) through the kernels,
    the dW's column scales in plain torch; results equal plain-torch quantization's."""
    g = torch.Generator(device="cuda").manual_seed(5)
    E, K, J = 4, 256, 384
    x = torch.randn(96, K, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(E, K, J, device="cuda", generator=g) * K ** -0.5).bfloat16().requires_grad_()
    dy = torch.randn(96, J, device="cuda", generator=g).bfloat16()
    offs = torch.tensor([16, 40, 40, 96], device="cuda", dtype=torch.int32)
    if not backend.scaled_grouped_mm_supported(x, w, w.transpose(1, 2)):
        pytest.skip("torch._scaled_grouped_mm needs sm90/sm100")
    results, calls = [], []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fp8_linear_mod, "fused_quantize_fits", lambda t: False)
        calls.append(_counting(monkeypatch))
        y = fp8_grouped_mm(x, w, offs=offs, kernel=True)
        y.backward(dy)
        results.append([y.detach(), x.grad, w.grad])
        x.grad = w.grad = None
    assert len(calls[0]) == 4 and len(calls[1]) == 0
    for a, b in zip(*results):
        assert torch.equal(a, b)
