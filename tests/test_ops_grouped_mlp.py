"""Grouped expert MLP fast paths vs expert_mlp_reference: the weight-streaming, tiled and
persistent Triton kernels (forward) and grouped_mm with the fused activation (forward and
backward, where torch._grouped_mm runs)."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.ops.backend import EXPERT_BACKENDS, grouped_mm_supported  # noqa: E402
from moeflow.ops.expert_mlp import expert_mlp_reference  # noqa: E402
from moeflow.ops.expert_activation_triton import fused_activation  # noqa: E402
from moeflow.ops.grouped_mlp_triton import expert_mlp_stream, stream_counters  # noqa: E402
from moeflow.ops.activation import apply_activation  # noqa: E402


def _problem(N, D, F, E, activation, bias, dtype, seed=0):
    torch.manual_seed(seed)
    I = 2 * F if activation == "swiglu" else F
    counts = torch.multinomial(torch.rand(E), N, replacement=True).bincount(minlength=E)
    counts[torch.randint(0, E, (1,))] = 0  # one idle expert
    ends = torch.cumsum(counts, 0)
    n = int(ends[-1])
    mk = lambda *s: (torch.randn(*s, device=DEVICE) * s[-2] ** -0.5).to(dtype)  # noqa: E731
    x = torch.randn(n + 3, D, device=DEVICE).to(dtype)  # 3 parked rows past the end
    w_in, w_out = mk(E, D, I), mk(E, F, D)
    b_in = (torch.randn(E, I, device=DEVICE) * 0.1).to(dtype) if bias else None
    b_out = (torch.randn(E, D, device=DEVICE) * 0.1).to(dtype) if bias else None
    return x, ends.to(DEVICE), w_in, b_in, w_out, b_out, n


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tol(dtype: torch.dtype) -> float:
    """Bound on the kernels' relative error against the reference, from the dtype: bf16 keeps
    8 bits, so each stored h and y is off by up to 2^-9 and the rounding of the inputs compounds
    through two GEMMs and the activation (~1e-2); fp32 sums of K products (K ≤ 128 on the CPU)
    differ only by the order of the sums, under K · 2^-24 ≈ 8e-6 of an element at worst and about
    sqrt(K) · 2^-24 ≈ 7e-7 typically (measured: ≤ 2.5e-7). A wrong activation (GELU's tanh form,
    2e-4 off) or a dropped bias must fail the fp32 bound."""
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("backend", ["stream", "tiled", "persistent"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows_per_expert", [1, 5, 40])
def test_inference_kernels_match_reference(backend, activation, bias, rows_per_expert):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F, E = (1024, 768, 16) if ON_GPU else (48, 40, 4)
    x, ends, w_in, b_in, w_out, b_out, n = _problem(rows_per_expert * E, D, F, E, activation,
                                                    bias, dtype)
    ref = expert_mlp_reference(x, ends, w_in, b_in, w_out, b_out, activation)[:n]
    out = EXPERT_BACKENDS[backend](x, ends, w_in, b_in, w_out, b_out, activation)[:n]
    assert _rel_err(out, ref) < _tol(dtype)


@pytest.mark.parametrize("counts", [[16, 0, 32, 1, 0, 17, 0, 0], [0, 0, 0, 0, 0, 0, 0, 50],
                                    [33, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 0, 1]])
@pytest.mark.parametrize("backend", ["tiled", "persistent"])
def test_tiles_map_to_their_expert_and_rows(counts, backend):
    """The tiled kernels' programs, and the persistent kernels' tiles, walk expert, column tile,
    row tile: experts with whole and partial row tiles (CPU tiles: 16 rows, 32 columns), idle
    experts before, between and after, and the programs past the last tile must each land on
    their own rows and weights. D and F not multiples of the K tile (CPU: 72 and 40 against
    16 / 32): the persistent kernels' TMA tiles then reach past an expert's weight rows."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F = (1032, 776) if ON_GPU else (72, 40)
    E = len(counts)
    _, _, w_in, b_in, w_out, b_out, _ = _problem(E, D, F, E, "swiglu", True, dtype)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    x = torch.randn(int(ends[-1]), D, device=DEVICE).to(dtype)
    ref = expert_mlp_reference(x, ends, w_in, b_in, w_out, b_out, "swiglu")
    out = EXPERT_BACKENDS[backend](x, ends, w_in, b_in, w_out, b_out, "swiglu")
    assert _rel_err(out, ref) < _tol(dtype)

@pytest.mark.parametrize("counts", [[0, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
                                    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
                                    [0] * 15 + [1]])
def test_stream_finds_the_active_experts_of_a_decode_batch(counts):
    """Fewer rows than experts (decode): the grid has one column of programs per row, not per
    expert, and each program finds its active expert in ends_E; idle experts before, between
    and after the active ones must not shift which weights a row meets."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F = (1024, 768) if ON_GPU else (48, 40)
    E = len(counts)
    _, _, w_in, _, w_out, _, _ = _problem(E, D, F, E, "swiglu", False, dtype)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    n = int(ends[-1])
    x = torch.randn(n, D, device=DEVICE).to(dtype)
    ref = expert_mlp_reference(x, ends, w_in, None, w_out, None, "swiglu")
    out = EXPERT_BACKENDS["stream"](x, ends, w_in, None, w_out, None, "swiglu")
    assert _rel_err(out, ref) < _tol(dtype)



@pytest.mark.parametrize("counts", [[0, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
                                    [3, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 1],
                                    [0] * 15 + [1], [2] * 16])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_stream_in_one_launch_equals_two_launches(counts, activation, bias):
    """With counters the up and down programs run as one launch, each down program waiting for
    its expert's up tiles: the same tiles give the same values, bit for bit (CPU: both with
    32-wide tiles); the counters are back at 0 after every call, so a second call (a replayed
    graph) waits for its own up tiles, not the last call's."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F = (1024, 768) if ON_GPU else (72, 40)
    E = len(counts)
    _, _, w_in, b_in, w_out, b_out, _ = _problem(E, D, F, E, activation, bias, dtype)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    n = int(ends[-1])
    x_TD = torch.randn(5, D, device=DEVICE).to(dtype)
    rows_N = torch.randint(0, 5, (n,), device=DEVICE)
    counters = stream_counters(E, DEVICE)
    ref = expert_mlp_reference(x_TD, ends, w_in, b_in, w_out, b_out, activation, False,
                               rows_N=rows_N)
    for _ in range(2):
        got = expert_mlp_stream(x_TD, ends, w_in, b_in, w_out, b_out, activation, False,
                                rows_N=rows_N, counters=counters)
        assert torch.count_nonzero(counters) == 0
        assert _rel_err(got, ref) < _tol(dtype)
    if not ON_GPU:  # on a GPU each launch kind autotunes its own tiles
        want = expert_mlp_stream(x_TD, ends, w_in, b_in, w_out, b_out, activation, False,
                                 rows_N=rows_N)
        assert torch.equal(got, want)


def test_stream_counters_are_checked():
    x, ends, w_in, b_in, w_out, b_out, _ = _problem(8, 48, 40, 4, "swiglu", False,
                                                    torch.float32)
    for bad in (torch.zeros(7, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="counters must be int32 with 8 entries"):
            expert_mlp_stream(x.to(DEVICE), ends, w_in, None, w_out, None, "swiglu",
                              counters=bad.to(DEVICE))


@pytest.mark.parametrize("backend", ["stream", "tiled", "persistent"])
def test_inference_kernels_gather_their_rows_exactly(backend):
    """rows_N (the deferred dispatch gather): the up kernel reads row n from x[rows_N[n]]; the
    result equals the kernels on the gathered rows bit for bit."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F, E = (1024, 768, 16) if ON_GPU else (48, 40, 4)
    x, ends, w_in, b_in, w_out, b_out, n = _problem(3 * E, D, F, E, "swiglu", True, dtype)
    x_TD = x[:7]
    rows_N = torch.randint(0, 7, (n,), device=DEVICE)
    stream = EXPERT_BACKENDS[backend]
    want = stream(x_TD[rows_N], ends, w_in, b_in, w_out, b_out, "swiglu", False)
    got = stream(x_TD, ends, w_in, b_in, w_out, b_out, "swiglu", False, rows_N=rows_N)
    assert got.shape == want.shape and torch.equal(got, want)
    ref = expert_mlp_reference(x_TD, ends, w_in, b_in, w_out, b_out, "swiglu", False,
                               rows_N=rows_N)
    assert _rel_err(got, ref) < _tol(dtype)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_activation_forward_backward(activation):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    N, F = (4096, 1536) if ON_GPU else (13, 40)
    torch.manual_seed(0)
    h = torch.randn(N, 2 * F if activation == "swiglu" else F, device=DEVICE, dtype=dtype)
    g = torch.randn(N, F, device=DEVICE, dtype=dtype)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    ref = apply_activation(h1, activation)
    out = fused_activation(h2, activation)
    ref.backward(g)
    out.backward(g)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel_err(out, ref) < tol
    assert _rel_err(h2.grad, h1.grad) < tol


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_fused_matches_reference_with_backward(activation):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F, E, N = (1024, 512, 8, 4096) if ON_GPU else (32, 16, 4, 24)
    x, ends, w_in, b_in, w_out, b_out, n = _problem(N, D, F, E, activation, True, dtype)
    x = x[:n].contiguous()
    if not grouped_mm_supported(x, w_in, w_out):
        pytest.skip("torch._grouped_mm does not run for these operands here")
    g = torch.randn(n, D, device=DEVICE, dtype=dtype)

    def run(name, cast):
        leaves = [cast(t).requires_grad_(True) for t in (x, w_in, b_in, w_out, b_out)]
        y = EXPERT_BACKENDS[name](leaves[0], ends, leaves[1], leaves[2], leaves[3], leaves[4],
                                  activation)
        y.backward(cast(g))
        return [y] + [t.grad for t in leaves]

    fast = run("grouped_mm_fused", lambda t: t.clone())
    if dtype == torch.float32:
        for a, b in zip(fast, run("reference", lambda t: t.clone())):
            assert _rel_err(a, b) < _tol(dtype)
        return
    # bf16: both paths round differently (the reference rounds after every op of the
    # activation and its backward, the fused path once), so each is measured against the
    # fp32 reference on the same bf16 inputs; the fast path must be about as close as the
    # bf16 reference (bias gradients are sums with cancellation, where both drift most).
    truth = run("reference", lambda t: t.float())
    ref = run("reference", lambda t: t.clone())
    names = ("y", "x", "w_in", "b_in", "w_out", "b_out")
    for name, a, r, t in zip(names, fast, ref, truth):
        err, ref_err = _rel_err(a, t), _rel_err(r, t)
        assert err < max(1e-2, 1.5 * ref_err), (name, err, ref_err)


def test_row_bias_gradient_accumulates_in_fp32():
    """The grouped paths add biases per row; their gradient sums hundreds of bf16 rows per
    expert and must round once (as the reference's broadcast sum), not at every add."""
    from moeflow.ops.expert_mlp import _row_bias
    E, I, rows = 4, 64, 512
    torch.manual_seed(0)
    ends = torch.cumsum(torch.full((E,), rows), 0).to(DEVICE)
    b = torch.randn(E, I, device=DEVICE).bfloat16().requires_grad_(True)
    g = torch.randn(E * rows, I, device=DEVICE).bfloat16()
    _row_bias(b, ends, E * rows).backward(g)
    truth = g.float().view(E, rows, I).sum(1)
    assert _rel_err(b.grad, truth) < 5e-3


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ["grouped_mm", "grouped_mm_fused"])
def test_grouped_parked_rows_are_zero_and_carry_no_gradient(activation, bias, name):
    """torch._grouped_mm leaves rows past the last offset unwritten; with uninitialised memory
    filled with NaN (deterministic mode), the parked rows' outputs must still be exact zeros,
    their input gradient exact zeros, and every weight and bias gradient the reference's."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F, E, N = (1024, 512, 8, 4096) if ON_GPU else (32, 16, 4, 24)
    x, ends, w_in, b_in, w_out, b_out, n = _problem(N, D, F, E, activation, bias, dtype)
    if not grouped_mm_supported(x, w_in, w_out):
        pytest.skip("torch._grouped_mm does not run for these operands here")
    g = torch.randn(x.shape[0], D, device=DEVICE, dtype=dtype)
    g[n:] = 0  # a parked (dropped) row's gradient, which y's mask would zero anyway

    def run(backend, fill):
        leaves = [t.clone().requires_grad_(True) if t is not None else None
                  for t in (x, w_in, b_in, w_out, b_out)]
        with _deterministic(fill):
            y = EXPERT_BACKENDS[backend](leaves[0], ends, *leaves[1:], activation)
            y.backward(g)
        return [y.detach()] + [t.grad for t in leaves if t is not None]

    fast, ref = run(name, fill=True), run("reference", fill=False)
    assert (fast[0][n:] == 0).all() and (fast[1][n:] == 0).all()
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all()
        assert _rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else _tol(dtype))


class _deterministic:
    """Deterministic algorithms with uninitialised memory filled (NaN for floats) inside."""

    def __init__(self, fill):
        self.fill = fill

    def __enter__(self):
        self.saved = (torch.are_deterministic_algorithms_enabled(),
                      torch.utils.deterministic.fill_uninitialized_memory)
        if self.fill:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = True

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.saved[0], warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = self.saved[1]


@pytest.mark.parametrize("rows", [1, 8, 16])
def test_experts_stream_in_one_launch(rows):
    """The Experts module runs the stream kernels as one launch (its counters kept on the
    module, left at 0), with the two launches' values (CPU: the same tiles, bit for bit)."""
    from moeflow.model.experts import Experts
    from moeflow.ops.backend import Backends

    torch.manual_seed(0)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    experts = Experts(4, 48, 40, "swiglu", False, Backends(experts="stream")).to(DEVICE, dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(5, 48, device=DEVICE).to(dtype)
        ends = torch.tensor([rows // 2, rows // 2, max(rows - 1, rows // 2), rows],
                            device=DEVICE)
        rows_N = torch.randint(0, 5, (rows,), device=DEVICE)
        got = experts(x, ends, parked=False, rows_N=rows_N)
        counters = experts._stream_counters.get(8, x.device)
        experts(x, ends, parked=False, rows_N=rows_N)  # a second launch, on the same counters
        assert experts._stream_counters.get(8, x.device) is counters  # kept, not remade
        assert torch.count_nonzero(counters) == 0  # every launch leaves them at 0
        want = expert_mlp_stream(x, ends, experts.w_in_EDI, None, experts.w_out_EFD, None,
                                 "swiglu", False, rows_N=rows_N)
    if ON_GPU:
        assert _rel_err(got, want) < 1e-2
    else:
        assert torch.equal(got, want)


def test_device_counters_are_made_once_per_device_and_count():
    from moeflow.ops.device_counters import DeviceCounters

    counters = DeviceCounters()
    first = counters.get(6, torch.device(DEVICE))
    assert first.dtype == torch.int32 and first.numel() == 6 and not first.any()
    assert counters.get(6, first.device) is first
    other = counters.get(8, first.device)
    assert other.numel() == 8 and other is not first and not other.any()
    assert counters.get(8, first.device) is other


def test_persistent_experts_refuse_gpus_without_tma(monkeypatch):
    """The persistent kernels load through TMA: on a GPU older than Hopper they stop with one
    line naming the GPU; on Hopper they run one program per SM, with the sm_90 configs (ws)
    on sm_90 only."""
    from types import SimpleNamespace

    from moeflow.ops import persistent_mlp_triton as pm
    gpus = {0: SimpleNamespace(major=8, minor=0, name="NVIDIA A100", multi_processor_count=108),
            1: SimpleNamespace(major=9, minor=0, name="NVIDIA H200", multi_processor_count=132),
            2: SimpleNamespace(major=10, minor=0, name="NVIDIA B200", multi_processor_count=148)}
    monkeypatch.setattr(pm.torch.cuda, "get_device_properties", lambda i: gpus[i])
    pm._device_launch.cache_clear()
    try:
        with pytest.raises(ValueError, match="Hopper.*A100"):
            pm._device_launch(0)
        assert pm._device_launch(1) == (132, True)
        assert pm._device_launch(2) == (148, False)
    finally:
        pm._device_launch.cache_clear()


@pytest.mark.parametrize("variant", [{"STORE_SPLIT": 1}, {"STORE_SPLIT": 2}, {"FLATTEN": True}],
                         ids=["tma-store-1", "tma-store-2", "flatten"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_persistent_variants_equal_the_plain_loop(variant, activation):
    """h and y bit for bit the plain configs' (pointer stores, the tile and K loops nested),
    rows past ends_E[-1] unwritten by both, on experts of whole tiles, partial ones, idle ones
    and one-row ones; F and D not multiples of the column tile. STORE_SPLIT > 0: each whole
    row tile stored through TMA (in that many column pieces) and the expert's last, partial
    one by pointers, which must not touch the next expert's rows (the TMA store clips the
    columns). FLATTEN (the down kernel's only): one loop over tiles x K steps, so the
    pipeliner loads the next tile's first stages before this tile's epilogue (the interpreter
    runs both alike; on the GPU each compiles its own pipeline)."""
    from moeflow.ops import persistent_mlp_triton as pm
    p = _persistent_problem(activation)
    launch = {"num_warps": 8, "num_stages": 3} if ON_GPU else {}
    up_variant = {k: v for k, v in variant.items() if k != "FLATTEN"}
    outs = []
    for up_b, down_b in ((p.blocks, p.blocks),
                         (dict(p.blocks, **up_variant), dict(p.blocks, **variant))):
        h = torch.full((p.n + 5, p.F), 7.0, device=DEVICE, dtype=p.dtype)
        y = torch.full((p.n + 5, p.D), 7.0, device=DEVICE, dtype=p.dtype)
        pm.launch_up(p.x, None, p.ends, p.w_in, p.b_in, h, activation == "swiglu", p.programs,
                     p.ws, up_b, launch)
        pm.launch_down(h, p.ends, p.w_out, p.b_out, y, p.programs, p.ws, down_b, launch)
        outs.append((h, y))
    (h0, y0), (h1, y1) = outs
    assert torch.equal(h1, h0) and torch.equal(y1, y0)
    assert (h1[p.n:] == 7).all() and (y1[p.n:] == 7).all()
    ref = expert_mlp_reference(p.x[:p.n], p.ends, p.w_in, p.b_in, p.w_out, p.b_out, activation)
    assert _rel_err(y1[:p.n], ref) < _tol(p.dtype)


def _persistent_problem(activation: str):
    """The persistent kernels' parity problem: experts of whole tiles, partial ones, idle ones
    and one-row ones (128-row tiles on the GPU, 16 on the CPU), F and D not multiples of the
    column tile, biases, 5 rows past ends_E[-1]; the launch's programs and tiles."""
    from types import SimpleNamespace

    from moeflow.ops import persistent_mlp_triton as pm
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    D, F = (1032, 776) if ON_GPU else (72, 40)
    counts = [128, 0, 257, 1, 0, 130, 64, 300] if ON_GPU else [16, 0, 32, 1, 0, 17, 0, 48]
    E = len(counts)
    _, _, w_in, b_in, w_out, b_out, _ = _problem(E, D, F, E, activation, True, dtype)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    n = int(ends[-1])
    x = torch.randn(n + 5, D, device=DEVICE).to(dtype)
    programs, ws = (pm._device_launch(x.device.index or 0) if ON_GPU else (3, False))
    blocks = ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64} if ON_GPU
              else pm._INTERPRETER_BLOCKS)
    return SimpleNamespace(dtype=dtype, D=D, F=F, x=x, ends=ends, n=n, w_in=w_in, b_in=b_in,
                           w_out=w_out, b_out=b_out, programs=programs, ws=ws, blocks=blocks)


@pytest.mark.parametrize("ws,F,rows,swiglu,up_mn,down_m,stores", [
    (True, 768, 128, True, (64, 256), 128, 0), (True, 14336, 256, True, (64, 256), 64, 0),
    (True, 8192, 128, False, (128, 256), 64, 0), (True, 768, 512, True, (64, 256), 128, 0),
    (True, 768, 1024, True, (128, 128), 128, 1), (True, 768, 1024, False, (128, 128), 128, 1),
    (False, 14336, 256, True, (128, 128), 128, 0)])
def test_persistent_tiles_follow_rows_width_and_activation(ws, F, rows, swiglu, up_mn, down_m,
                                                           stores):
    """Warp-specialised (sm_90): SwiGLU's up kernel on 64 x 256 tiles (its two accumulators),
    GELU's on 128 x 256 (one accumulator, the same registers); the down kernel on 64-row tiles
    for sums longer than DOWN_SHORT_K_MAX. Above LONG_EXPERT_ROWS rows per expert both store
    whole row tiles through TMA, up on 128 x 128 tiles and down on 128 x 256. Elsewhere the
    128-row tiles throughout, pointer stores. Every config fits the shared memory: a tile's
    stages hold x, the weight halves (and h for down), plus the staged output piece."""
    from moeflow.ops import persistent_mlp_triton as pm
    up, up_launch, down, down_launch = pm._configs(ws, F, rows, swiglu)
    assert (up["BLOCK_M"], up["BLOCK_N"]) == up_mn and down["BLOCK_M"] == down_m
    assert bool(up.get("STORE_SPLIT")) == bool(down.get("STORE_SPLIT")) == bool(stores)
    assert not up.get("FLATTEN")
    assert down.get("FLATTEN", False) == (ws and F <= pm.DOWN_SHORT_K_MAX and not stores)
    halves = 2 if swiglu else 1

    def staged(blocks):
        split = blocks.get("STORE_SPLIT", 0)
        return 2 * blocks["BLOCK_M"] * blocks["BLOCK_N"] // split if split else 0

    up_stage = 2 * up["BLOCK_K"] * (up["BLOCK_M"] + halves * up["BLOCK_N"])
    down_stage = 2 * down["BLOCK_K"] * (down["BLOCK_M"] + down["BLOCK_N"])
    assert up_stage * up_launch["num_stages"] + staged(up) <= 227 * 1024
    assert down_stage * down_launch["num_stages"] + staged(down) <= 227 * 1024


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_bias_passes_match_the_plain_composition(activation):
    """moeflow.ops.expert_bias_triton against the plain gather-add-mask composition, with an
    empty expert, uneven experts (one of 37 rows: split among programs) and parked rows:
    outputs, input and bias gradients. The composition runs in fp32 on the same values (in
    bf16 its bias gradient would round at every add of the gather's backward); the fused passes
    in the test's dtype, so on the GPU they are held to bf16's rounding."""
    from moeflow.ops.expert_bias_triton import activate_with_bias, add_bias
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    F, X = (768, 2048) if ON_GPU else (24, 40)
    counts = [5, 0, 37, 2] if not ON_GPU else [700, 0, 3000, 25]
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    E, N = len(counts), int(ends[-1]) + 1100  # parked rows: more than one stride of them
    I = 2 * F if activation == "swiglu" else F
    torch.manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)
    h, y, b_in, b_out = randn(N, I), randn(N, X), randn(E, I), randn(E, X)
    g_a, g_y = randn(N, F), randn(N, X)
    expert = torch.repeat_interleave(torch.arange(E, device=DEVICE),
                                     torch.tensor(counts, device=DEVICE))
    kept = torch.zeros(N, 1, dtype=torch.bool, device=DEVICE)
    kept[:len(expert)] = True
    expert = torch.cat([expert, torch.full((N - len(expert),), E - 1, device=DEVICE)])

    def plain(h, b_in, y, b_out):
        a = apply_activation((h + b_in[expert]).masked_fill(~kept, 0), activation)
        return a, (y + b_out[expert]).masked_fill(~kept, 0)

    def fused(h, b_in, y, b_out):
        return activate_with_bias(h, b_in, ends, activation), add_bias(y, b_out, ends)

    results = []
    for fn, cast in ((plain, lambda t: t.float().clone()), (fused, torch.Tensor.clone)):
        leaves = [cast(t).requires_grad_(True) for t in (h, b_in, y, b_out)]
        a, out = fn(*leaves)
        (a * cast(g_a)).sum().backward()
        out.backward(cast(g_y) * kept)  # the parked rows' gradient is never read (grouped_mm)
        # parked rows of a and of h's gradient: unspecified in the fused pass (as grouped_mm's)
        results.append([a.where(kept, 0), out, leaves[0].grad.where(kept, 0)]
                       + [t.grad for t in leaves[1:]])
    assert (results[1][1][~kept[:, 0]] == 0).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, got, ref in zip(("a", "y", "g_h", "g_b_in", "g_y", "g_b_out"), *results):
        assert _rel_err(got.float(), ref) < tol, name
    assert (results[1][3][1] == 0).all()  # the empty expert's bias gradient
