"""The split-K decode expert MLP (moeflow.ops.stream_splitk_triton) against expert_mlp_reference
in float64 and against the stream kernels it replaces; a tiny model decodes the same greedy
tokens with it as with the reference backends.

Tolerances come from the dtype: the output and h are each rounded once to the dtype (unit
roundoff u each) and the fp32 sums over D and F terms add at most (D + F)·u32 relative to the
sum of magnitudes; the bound is twice that. On the CPU (Triton's interpreter, whose tl.dot does
not run in bf16) the tests run in fp32, on a GPU in bf16."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.ops import backend, stream_splitk_triton  # noqa: E402
from moeflow.ops.backend import EXPERT_BACKENDS, Backends  # noqa: E402
from moeflow.ops.expert_mlp import expert_mlp_reference  # noqa: E402
from moeflow.ops.stream_splitk_triton import SplitKLaunch, expert_mlp_stream_splitk  # noqa: E402

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# D = 80 in chunks of 16 is 5 chunks: SPLIT_K 2 and 3 give unequal shares (2+3, 1+2+2);
# F = 40 is not a multiple of the 32-wide column tiles.
D, F, E = (1024, 768, 16) if ON_GPU else (80, 40, 6)
BLOCK_K = 128 if ON_GPU else 16


def _launch(split_k: int, block_k: int = BLOCK_K) -> SplitKLaunch:
    block_n = 64 if ON_GPU else 32
    return SplitKLaunch(split_k=split_k, up_block_n=block_n, up_block_k=block_k,
                        down_block_n=block_n, down_block_k=block_k)


def _tolerance(dtype: torch.dtype, D: int, F: int) -> float:
    u = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    return 2 * (2 * u + (D + F) * u32)


def _problem(counts, activation, bias, D=D, F=F, parked=3, seed=0):
    """Rows sorted by expert with the given per-expert counts, `parked` rows past the end."""
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    I = 2 * F if activation == "swiglu" else F
    ends = torch.cumsum(torch.tensor(counts), 0).to(DEVICE)
    n = int(ends[-1])

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)
    x = rand(n + parked, D)
    w_in, w_out = rand(E, D, I, scale=D ** -0.5), rand(E, F, D, scale=F ** -0.5)
    b_in = rand(E, I, scale=0.1) if bias else None
    b_out = rand(E, D, scale=0.1) if bias else None
    return (x, ends, w_in, b_in, w_out, b_out), n


def _float64(args):
    return tuple(t if t is None or not t.is_floating_point() else t.double() for t in args)


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Idle experts first, inside and last; expert 1 spans two 16-row tiles.
COUNTS = (0, 19, 1, 0, 4, 0) if not ON_GPU else (0, 19, 1, 0, 4, 0, 2, 1, 0, 3, 1, 1, 0, 2, 1, 0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_matches_float64_reference(activation, bias, split_k):
    args, n = _problem(COUNTS, activation, bias)
    truth = expert_mlp_reference(*_float64(args), activation)[:n]
    out = expert_mlp_stream_splitk(*args, activation, launch=_launch(split_k))
    assert out.shape == (n + 3, D) and out.dtype == DTYPE
    assert _rel_err(out[:n], truth) < _tolerance(DTYPE, D, F)


@pytest.mark.skipif(ON_GPU, reason="claimed under Triton's interpreter only: compiled, the two "
                    "kernels may lay their tensor-core products out differently")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_split_1_is_the_stream_kernels_bit_for_bit(activation):
    """SPLIT_K = 1 with the stream path's fixed interpreter blocks (32, 32): one running sum over
    D in the same order, the same bias add, activation and rounding of h."""
    args, n = _problem(COUNTS, activation, True)
    stream = EXPERT_BACKENDS["stream"](*args, activation)[:n]
    out = expert_mlp_stream_splitk(*args, activation, launch=_launch(1, block_k=32))[:n]
    assert torch.equal(out, stream)
    x, ends, *weights = args
    rows_N = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    stream = EXPERT_BACKENDS["stream"](x[:7], ends, *weights, activation, rows_N=rows_N)
    out = expert_mlp_stream_splitk(x[:7], ends, *weights, activation, rows_N=rows_N,
                                   launch=_launch(1, block_k=32))
    assert torch.equal(out, stream)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_sums_differ_from_the_stream_kernels_only_by_rounding(split_k):
    """With SPLIT_K > 1 the pre-activation is a sum of per-share sums, not one running sum:
    fp32 rounding differs, so h (in the dtype) may differ by a unit in its last place."""
    args, n = _problem(COUNTS, "swiglu", True, seed=1)
    stream = EXPERT_BACKENDS["stream"](*args, "swiglu")[:n]
    out = expert_mlp_stream_splitk(*args, "swiglu", launch=_launch(split_k))[:n]
    assert _rel_err(out, stream) < _tolerance(DTYPE, D, F)


@pytest.mark.parametrize("split_k", [1, 3])
def test_gathers_its_rows_exactly(split_k):
    """rows_N (the decode path's deferred dispatch gather): equal bit for bit to the same
    kernels on the gathered rows, and to the reference within the dtype's tolerance."""
    (x, ends, *weights), n = _problem(COUNTS, "swiglu", True, parked=0)
    x_TD = x[:7]
    rows_N = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = expert_mlp_stream_splitk(x_TD[rows_N], ends, *weights, "swiglu",
                                    launch=_launch(split_k))
    got = expert_mlp_stream_splitk(x_TD, ends, *weights, "swiglu", rows_N=rows_N,
                                   launch=_launch(split_k))
    assert got.shape == want.shape and torch.equal(got, want)
    truth = expert_mlp_reference(*_float64((x_TD, ends, *weights)), "swiglu", rows_N=rows_N)
    assert _rel_err(got, truth) < _tolerance(DTYPE, D, F)


@pytest.mark.parametrize("split_k,d", [(3, 16), (5, D)])
def test_every_partial_it_reads_was_written(monkeypatch, split_k, d):
    """A workspace full of NaN: shares without a chunk of D (D = 16 in one chunk, 3 shares) must
    still write their zeros, and nothing outside the written partials may be read."""
    real = stream_splitk_triton._workspace
    monkeypatch.setattr(stream_splitk_triton, "_workspace",
                        lambda *a: real(*a).fill_(float("nan")))
    args, n = _problem(COUNTS, "swiglu", True, D=d)
    out = expert_mlp_stream_splitk(*args, "swiglu", launch=_launch(split_k))[:n]
    truth = expert_mlp_reference(*_float64(args), "swiglu")[:n]
    assert torch.isfinite(out).all() and _rel_err(out, truth) < _tolerance(DTYPE, d, F)


def test_one_busy_expert_none_and_no_rows():
    counts = [0] * (len(COUNTS) - 1) + [5]  # only the last expert has rows
    args, n = _problem(counts, "gelu", True)
    truth = expert_mlp_reference(*_float64(args), "gelu")[:n]
    assert _rel_err(expert_mlp_stream_splitk(*args, "gelu", launch=_launch(2))[:n],
                    truth) < _tolerance(DTYPE, D, F)
    args, _ = _problem([0] * len(COUNTS), "gelu", False)  # only parked rows: nothing to compute
    assert expert_mlp_stream_splitk(*args, "gelu", launch=_launch(2)).shape == (3, D)
    args, _ = _problem(COUNTS, "gelu", False, parked=0)
    empty = expert_mlp_stream_splitk(args[0][:0], torch.zeros_like(args[1]), *args[2:], "gelu")
    assert empty.shape == (0, D)


def test_bad_launch_and_too_many_experts_raise():
    with pytest.raises(ValueError, match="split_k=0: must be an integer >= 1"):
        SplitKLaunch(split_k=0)
    with pytest.raises(ValueError, match="up_block_n=24: must be a power of two >= 16"):
        SplitKLaunch(up_block_n=24)
    args, _ = _problem([1] * 1025, "gelu", False, D=16, F=16)
    with pytest.raises(ValueError, match="1025 experts, at most 1024"):
        expert_mlp_stream_splitk(*args, "gelu")


def test_backend_is_registered_but_not_chosen_by_auto():
    assert Backends(experts="stream_splitk").experts == "stream_splitk"
    args, _ = _problem(COUNTS, "swiglu", False)
    x, _, w_in, _, w_out, _ = args
    chosen = backend.resolve_expert_backend("auto", x, w_in, w_out)
    assert chosen is not EXPERT_BACKENDS["stream_splitk"]


@pytest.mark.skipif(not ON_GPU, reason="the autotuner and CUDA graphs need CUDA")
def test_autotuned_and_graph_replayed_on_cuda():
    """launch=None (autotuned SPLIT_K) equals the reference; a captured call replayed with new
    rows and a new routing (written in place) equals an eager call on them."""
    from moeflow.infer.decode_graphs import capture_graph
    args, n = _problem(COUNTS, "swiglu", True)
    x, ends, *weights = args
    truth = expert_mlp_reference(*_float64(args), "swiglu")[:n]
    assert _rel_err(expert_mlp_stream_splitk(*args, "swiglu")[:n], truth) < _tolerance(
        DTYPE, D, F)
    graph, y = capture_graph(lambda: expert_mlp_stream_splitk(x, ends, *weights, "swiglu"),
                             (), None)
    (x2, ends2, *_), n2 = _problem(tuple(reversed(COUNTS)), "swiglu", True, seed=4)
    x.copy_(x2)
    ends.copy_(ends2)
    graph.replay()
    eager = expert_mlp_stream_splitk(x, ends, *weights, "swiglu")
    assert torch.equal(y[:n2], eager[:n2])


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                      max_seq_len=32, init_std=0.1, arch="llama", moe_kind="moe", moe_every=1,
                      num_experts=8, expert_d_ff=24,
                      router=RouterConfig(top_k=2, dropless=True, normalize_topk=True))
    model = Transformer(cfg)
    for layer in model.moe_layers():  # routing that depends on the input, not on ties
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return model.eval().to(DEVICE)


@pytest.mark.parametrize("gather", [False, True])
def test_tiny_model_decodes_the_reference_tokens(monkeypatch, gather):
    """Greedy decode through the engine, prefill and decode steps through the split-K experts
    (`gather`: with the one-launch decode router, whose plan the up kernel gathers its rows
    by), picks the reference backends' tokens."""
    calls = []
    kernel = EXPERT_BACKENDS["stream_splitk"]

    def counted(*args, **kwargs):
        calls.append(kwargs.get("rows_N") is not None)
        return kernel(*args, **kwargs)
    monkeypatch.setitem(EXPERT_BACKENDS, "stream_splitk", counted)
    fast_routing = dict(router="triton_decode", dispatch="triton") if gather else {}
    model = _tiny_model()
    prompt = torch.randint(0, 101, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    tokens, logits = {}, {}
    for label, backends in (("reference", Backends.reference()),
                            ("splitk", Backends(experts="stream_splitk", **fast_routing))):
        model.set_backends(backends)
        engine = Engine(model, EngineConfig(max_batch_size=1, max_seq_len=32))
        rows = []
        engine.logits_hook = lambda rid, row, rows=rows: rows.append(row.float().clone())
        tokens[label] = engine.generate([prompt], greedy)[0]
        logits[label] = torch.stack(rows)
    assert len(calls) >= 2 * greedy.max_new_tokens and all(c == gather for c in calls), calls
    assert tokens["splitk"] == tokens["reference"]
    torch.testing.assert_close(logits["splitk"], logits["reference"],
                               rtol=1e-2 if ON_GPU else 1e-4, atol=1e-2 if ON_GPU else 1e-4)


def test_autotuner_keeps_only_splits_the_workspace_holds():
    from moeflow.ops.stream_splitk_triton import SPLIT_K_MAX, _fitting_configs, _split_capacity
    configs = stream_splitk_triton._up_partials_kernel.configs
    for rows_bucket in (1, 2, 4, 8, 16, 64):
        cap = _split_capacity(rows_bucket)
        assert cap * min(rows_bucket, SPLIT_K_MAX) <= SPLIT_K_MAX and cap >= 1
        kept = _fitting_configs(configs, {"ws_ptr": torch.empty(0, cap, 1)})
        assert kept and all(c.kwargs["SPLIT_K"] <= cap for c in kept)
        assert len(kept) == sum(c.kwargs["SPLIT_K"] <= cap for c in configs)


def test_down_configs_are_pruned_to_the_shared_memory_budget():
    """The down kernel stages its SPLIT_K fp32 partials per pipeline stage: big splits keep only
    the configs that leave at least two programs per SM (at least one config always stays)."""
    from moeflow.ops.stream_splitk_triton import _DOWN_SMEM_BUDGET, _down_fits, _down_smem
    configs = stream_splitk_triton._down_from_partials_kernel.configs
    for split_k in (1, 2, 4, 8, 64):
        kept = _down_fits(configs, {"w_ptr": torch.empty(0, dtype=torch.bfloat16)},
                          SPLIT_K=split_k, SWIGLU=True, BLOCK_M=16)
        smem = [_down_smem(c, split_k, True, 16) for c in kept]
        assert kept and (max(smem) <= _DOWN_SMEM_BUDGET or len(kept) == 1)
        if split_k == 1:
            assert len(kept) == len(configs)
    # 4 splits of a SwiGLU, 64-wide K step, 2 stages: (4·2·16·64·4 + 64·32·2) bytes
    assert _down_smem(configs[0], 4, True, 16) == 36 * 1024
