"""The weight-streaming linear for a few rows (moeflow.ops.skinny_linear_triton) vs F.linear, the
rule that chooses it (moeflow.ops.backend.resolve_linear_backend) and its wiring into
moeflow.model.linear.project and the model."""

import dataclasses

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from moeflow.config import ModelConfig, RouterConfig  # noqa: E402
from moeflow.model.linear import project  # noqa: E402
from moeflow.model.transformer import Transformer  # noqa: E402
from moeflow.ops import backend, skinny_linear_triton  # noqa: E402
from moeflow.ops.backend import Backends, resolve_linear_backend  # noqa: E402
from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402

# The interpreter's dot takes no bf16: fp32 on the CPU, the models' dtype on the GPU.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (K, N). CPU: multiples of no interpreter block (BLOCK_K 32, BLOCK_N 16 and the one-row
# kernel's 4). GPU: the Qwen3-30B-A3B qkv projection, and a shape that no autotuned block
# (all >= 16 in K) divides.
SHAPES = [(2048, 5120), (1000, 2056)] if ON_GPU else [(72, 42)]


def _operands(M, K, N, bias, dtype=DTYPE, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) * K ** -0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def _exact_and_bound(x, w, b):
    """The exact result (fp64) and an elementwise bound on the error of an fp32 sum of the K
    products plus the bias (at most K·eps32 of the magnitudes, allowing accumulators that
    truncate), rounded once to x's dtype (half an eps of the result)."""
    xd, wd = x.double(), w.double()
    bd = b.double() if b is not None else None
    exact = F.linear(xd, wd, bd)
    magnitude = F.linear(xd.abs(), wd.abs(), bd.abs() if bd is not None else None)
    u_out = torch.finfo(x.dtype).eps / 2
    return exact, u_out * exact.abs() + (1 + u_out) * x.shape[-1] * torch.finfo().eps * magnitude


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,swap", [(1, False), (3, False), (16, False), (3, True), (16, True)])
def test_stream_matches_f_linear(M, swap, bias, shape, monkeypatch):
    """swap: the interpreter's fixed tile with the weight as the dot's M (yᵀ = W · xᵀ); on a
    GPU the autotuner picks the orientation, so the swapped cases are not repeated there."""
    if ON_GPU and swap:
        pytest.skip("the autotuner picks the orientation on a GPU")
    monkeypatch.setitem(skinny_linear_triton.INTERPRETER_BLOCKS, "SWAP", swap)
    K, N = shape
    x, w, b = _operands(M, K, N, bias)
    y = linear_stream(x, w, b)
    exact, bound = _exact_and_bound(x, w, b)
    assert y.shape == (M, N) and y.dtype == DTYPE
    assert ((y.double() - exact).abs() <= bound).all()
    # F.linear rounds once too: the two differ by at most both errors.
    assert ((y.double() - F.linear(x, w, b).double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("M", [1, 16])
def test_warming_l2_changes_no_bit(M):
    """warm_l2 (the first programs prefetch the weight before the PDL wait; on a CPU, without
    PDL, nothing is prefetched) gives the bits of the plain launch, at one row and at 16; a
    shape whose rows do not divide among the prefetching programs."""
    K, N = SHAPES[-1]
    x, w, b = _operands(M, K, N, True)
    assert torch.equal(linear_stream(x, w, b, warm_l2=True), linear_stream(x, w, b))


def test_stream_takes_strided_3d_input():
    """x [B, T, K] as a slice of a wider tensor and a transposed weight: y [B, T, N]."""
    K, N = SHAPES[-1]
    torch.manual_seed(1)
    x_BTK = torch.randn(2, 3, K + 8, device=DEVICE).to(DTYPE)[..., 4:K + 4]
    w = (torch.randn(K, N, device=DEVICE) * K ** -0.5).to(DTYPE).t()
    b = torch.randn(N, device=DEVICE).to(DTYPE)
    assert not x_BTK.is_contiguous() and not w.is_contiguous()
    y = linear_stream(x_BTK, w, b)
    exact, bound = _exact_and_bound(x_BTK, w, b)
    assert y.shape == (2, 3, N)
    assert ((y.double() - exact).abs() <= bound).all()
    x_11K = x_BTK[1:, 2:, :]  # one row: the register GEMV, same strides
    y = linear_stream(x_11K, w, b)
    exact, bound = _exact_and_bound(x_11K, w, b)
    assert y.shape == (1, 1, N)
    assert ((y.double() - exact).abs() <= bound).all()


def test_stream_refuses_what_it_cannot_compute_in_one_line():
    K, N = SHAPES[-1]
    x, w, b = _operands(17, K, N, bias=True)
    cases = [((x, w, b), "x has 17 rows, more than the 16"),
             ((x[:2], w, b), None),
             ((x[:2], w.to(torch.float16), b), "must share one of bfloat16, float16, float32"),
             ((x[:2], w[:, :-1], b), r"must be \[N, "),
             ((x[:2], w, b[:-1]), "bias"),
             ((x[:2], w.clone().requires_grad_(), b), "no backward")]
    for args, message in cases:
        if message is None:
            assert linear_stream(*args).shape == (2, N)
            continue
        with pytest.raises(ValueError, match=message) as err:
            linear_stream(*args)
        assert "\n" not in str(err.value)
    with torch.no_grad():  # no autograd, no complaint
        assert linear_stream(x[:2], w.clone().requires_grad_(), b).shape == (2, N)


def test_linear_backend_choice():
    """"auto" streams inference calls in bf16/fp16 on CUDA of up to 16 rows (fake CUDA
    tensors: the rule needs no GPU), and nothing else; a
    forced "stream" runs where the kernel computes what the plain linear would, on any device,
    and falls back to the plain linear elsewhere."""
    def resolve(requested, shape, dtype=torch.bfloat16, device="cuda", w_dtype=None, grad=False,
                outputs=8):
        x = torch.empty(*shape, dtype=dtype, device=device)
        w = torch.empty(outputs, shape[-1], dtype=w_dtype or dtype, device=device,
                        requires_grad=grad)
        return resolve_linear_backend(requested, x, w)

    assert backend.LINEAR_STREAM_MAX_ROWS == skinny_linear_triton.MAX_ROWS
    with FakeTensorMode():
        assert resolve("auto", (1, 32), grad=True) == "reference"  # training
        with torch.no_grad():
            assert resolve("auto", (1, 32), grad=True) == "stream"
        assert resolve("auto", (1, 32)) == "stream"  # nothing requires grad
        assert resolve("auto", (16, 32), torch.float16) == "stream"
        assert resolve("auto", (2, 8, 32)) == "stream"  # 16 rows in [B, T, K]
        assert resolve("auto", (1, 32), outputs=32) == "stream"  # N = K
        assert resolve("auto", (1, 32), outputs=33) == "stream"  # one row: the register GEMV
        assert resolve("auto", (1, 1, 32), outputs=33) == "stream"
        assert resolve("auto", (2, 32), outputs=33) == "stream"  # N > K: the swapped tiles
        assert resolve("stream", (2, 32), outputs=33) == "stream"
        assert resolve("auto", (17, 32)) == "reference"  # prefill
        assert resolve("auto", (2, 9, 32)) == "reference"
        assert resolve("auto", (1, 32), torch.float32) == "reference"
        assert resolve("auto", (1, 32), w_dtype=torch.float32) == "reference"
        assert resolve("reference", (1, 32)) == "reference"
        assert resolve("fp8", (1, 32)) == "stream"  # inference does not depend on FP8
        assert resolve("stream", (1, 32), grad=True) == "reference"
        assert resolve("stream", (17, 32)) == "reference"
    assert resolve("auto", (1, 32), device="cpu") == "reference"
    assert resolve("stream", (1, 32), torch.float32, device="cpu") == "stream"
    assert resolve("stream", (1, 32), torch.float32, "cpu", w_dtype=torch.bfloat16) == "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would compute in bf16
        assert resolve("stream", (1, 32), torch.float32, device="cpu") == "reference"
    assert resolve("fp8", (4, 16), torch.float32, "cpu", grad=True) == "fp8_reference"
    assert Backends(matmul="stream").matmul == "stream"
    with pytest.raises(ValueError, match="matmul='streams': must be one of .*stream"):
        Backends(matmul="streams")


def test_project_runs_the_kernel_and_keeps_the_bias_contract(monkeypatch):
    """project() streams where resolve_linear_backend says so ("auto" on the GPU, forced here):
    with the bias, and without it for a row-parallel partial sum; under autograd it runs the
    plain linear."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return linear_stream(*args, **kwargs)

    monkeypatch.setattr(skinny_linear_triton, "linear_stream", spy)
    matmul = "auto" if ON_GPU else "stream"
    N, K = SHAPES[-1]  # transposed: "auto" streams only weights with N <= K
    torch.manual_seed(2)
    layer = nn.Linear(K, N, device=DEVICE, dtype=DTYPE)
    x_BTK = torch.randn(1, 3, K, device=DEVICE).to(DTYPE)
    with torch.no_grad():
        for bias in (True, False):
            y = project(layer, x_BTK, matmul, bias=bias)
            b = layer.bias if bias else None
            exact, bound = _exact_and_bound(x_BTK, layer.weight, b)
            assert ((y.double() - exact).abs() <= bound).all()
        assert [c[2] is layer.bias for c in calls] == [True, False]
    y = project(layer, x_BTK, matmul)
    assert y.grad_fn is not None and len(calls) == 2


def test_model_forward_with_the_stream_matmul_matches_reference():
    """A small MoE transformer's inference forward (3 tokens: every projection streams; fp32,
    exact dots on the GPU too) with the kernel matches plain torch."""
    torch.manual_seed(3)
    cfg = ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                      n_kv_heads=2, head_dim=8, max_seq_len=16, moe_every=1, first_moe_layer=1,
                      num_experts=4, expert_d_ff=16, num_shared_experts=1,
                      router=RouterConfig(top_k=2, dropless=True))
    model = Transformer(cfg, backends=Backends.reference()).to(DEVICE).eval()
    ids = torch.randint(0, 64, (1, 3), device=DEVICE)
    with torch.no_grad():
        ref = model(ids, inference=True).logits
        model.set_backends(dataclasses.replace(Backends.reference(), matmul="stream"))
        got = model(ids, inference=True).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
