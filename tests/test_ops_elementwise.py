"""The one-pass Triton RMSNorm, add + RMSNorm and q/k norm + RoPE vs their plain-torch references
(moeflow.model.norms.rms_norm, moeflow.model.attention.prepare_qk), and the model using them.

Under Triton's interpreter (no GPU) in fp32 on tiny shapes: only the order of fp32 sums differs.
On a GPU also bf16 at the Qwen3-30B-A3B prefill shape, to one unit of bf16 rounding."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.model.attention import prepare_qk  # noqa: E402
from moeflow.model.norms import rms_norm  # noqa: E402
from moeflow.ops import backend  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from moeflow.ops.norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from moeflow.ops import qk_rope_triton  # noqa: E402
from moeflow.ops.qk_rope_triton import qk_norm_rope_triton  # noqa: E402
from moeflow.model.rope import rope_cos_sin  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def _tol(dtype):
    # bf16: the kernels round once where the reference rounds at every op (RoPE) or sums in
    # another order (norms): one unit of bf16 (2^-8 relative) at most, on values of size ~3.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_add_norm_match_reference(dtype):
    T, D = (2048, 2048) if ON_GPU else (5, 24)  # D=24: a row shorter than the kernel's block
    torch.manual_seed(0)
    x = torch.randn(2, T, D, device=DEVICE).to(dtype)
    h = torch.randn(2, T, D, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE)).to(dtype)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-6), rms_norm.reference(x, w, 1e-6),
                               **_tol(dtype))
    s, y = add_rms_norm_triton(x, h, w, 1e-6)
    assert torch.equal(s, x + h)  # the residual sum is rounded exactly as the plain add
    torch.testing.assert_close(y, rms_norm.reference(x + h, w, 1e-6), **_tol(dtype))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, h[:, :1], w, 1e-6)


def _qk_args(B, T, H, G, hd, dtype, norm, rope, interleave, seed):
    """prepare_qk's arguments as the attention module has them: q and k strided head views of
    one qkv projection; cos and sin with positions per batch row (the decode view's [B, T] case)
    and an offset."""
    torch.manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * G) * hd, device=DEVICE).to(dtype)
    q, k, _ = qkv.split([H * hd, G * hd, G * hd], dim=-1)
    q_BHTd = q.view(B, T, H, hd).transpose(1, 2)
    k_BGTd = k.view(B, T, G, hd).transpose(1, 2)
    qw = (1 + 0.1 * torch.randn(hd, device=DEVICE)).to(dtype) if norm else None
    kw = (1 + 0.1 * torch.randn(hd, device=DEVICE)).to(dtype) if norm else None
    cos = sin = None
    if rope:
        positions = (torch.arange(T, device=DEVICE)[None]
                     + 7 * torch.arange(B, device=DEVICE)[:, None])
        cos, sin = rope_cos_sin(positions, hd, 10000.0, dtype)
    return q_BHTd, k_BGTd, qw, kw, 1e-6, cos, sin, interleave


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,rope,interleave", [(True, True, False), (True, True, True),
                                                  (False, True, False), (True, False, False)])
def test_qk_norm_rope_matches_reference(dtype, norm, rope, interleave):
    B, T, H, G, hd = (1, 2048, 32, 4, 128) if ON_GPU else (2, 3, 3, 1, 8)
    args = _qk_args(B, T, H, G, hd, dtype, norm, rope, interleave, seed=1)
    q_BHTd, k_BGTd, qw, kw = args[:4]
    q_ref, k_ref = prepare_qk.reference(*args)
    q_out, k_out = qk_norm_rope_triton(*args)
    assert q_out.shape == q_ref.shape and k_out.shape == k_ref.shape
    # q in [B, T, H, hd] memory (the attention output follows it; its reshape is then a view),
    # k contiguous (the KV cache's layout).
    assert q_out.transpose(1, 2).is_contiguous() and k_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, **_tol(dtype))
    torch.testing.assert_close(k_out, k_ref, **_tol(dtype))
    if rope:  # one cos/sin row shared by the batch ([1, T, hd], prefill)
        cos1, sin1 = rope_cos_sin(torch.arange(T, device=DEVICE)[None], hd, 10000.0, dtype)
        args = (q_BHTd, k_BGTd, qw, kw, 1e-6, cos1, sin1, interleave)
        torch.testing.assert_close(qk_norm_rope_triton(*args)[0], prepare_qk.reference(*args)[0],
                                   **_tol(dtype))


# (tokens, heads per program, num_warps). On the GPU each tile has its own layout, and so its
# own order of tl.sum: the norm's fixed-order sum of squares is what keeps the bits equal.
QK_TILES = ([(1, 4, 2), (16, 8, 4), (2, 16, 1), (8, 32, 8), (4, 2, 4)] if ON_GPU else
            [(1, 4, 1), (2, 2, 2), (8, 4, 4)])


@pytest.mark.parametrize("interleave", [False, True])
def test_qk_norm_rope_tiles_give_the_same_bits(interleave):
    """Every tile writes the default tile's bits, where tokens and heads per program divide
    neither the tokens nor the heads (CPU: 5 tokens, 5 query and 3 kv heads; GPU: 2000 tokens
    of the Qwen3-30B-A3B attention in bf16), over two batch rows with their own positions."""
    B, T, H, G, hd = (2, 2000, 32, 4, 128) if ON_GPU else (2, 5, 5, 3, 8)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    args = _qk_args(B, T, H, G, hd, dtype, True, True, interleave, seed=2)
    want = qk_norm_rope_triton(*args)
    ref = prepare_qk.reference(*args)
    for got, r in zip(want, ref):
        torch.testing.assert_close(got, r, **_tol(dtype))
    outs = []  # kept alive: a tile that skips a write must not find the last tile's output
    for block_t, block_h, num_warps in QK_TILES:
        outs.append(qk_rope_triton._launch(*args, block_t=block_t, block_h=block_h,
                                           num_warps=num_warps))
        for got, w in zip(outs[-1], want):
            assert torch.equal(got, w), (block_t, block_h, num_warps)
    with pytest.raises(ValueError, match="block_h"):
        qk_rope_triton._launch(*args, block_h=3)


def test_elementwise_backend_choice():
    big = torch.empty(backend.FUSE_MAX_ELEMENTS + 1)
    with torch.no_grad():
        assert backend.resolve_elementwise_backend("auto", big) == "reference"  # CPU
        assert backend.resolve_elementwise_backend("triton", big[:4]) == "triton"
        assert backend.resolve_elementwise_backend("reference", big) == "reference"
    assert backend.resolve_elementwise_backend("triton", big) == "reference"  # autograd on


def test_elementwise_auto_takes_triton_at_every_size_where_triton_runs(monkeypatch):
    """On CUDA (here: where _triton_cuda says Triton runs) "auto" takes the one-pass kernels
    for a decode-sized row as for a prefill: at decode the compiled norm left the residual add
    to a kernel of its own (benchmarks/results/decode_timeline)."""
    monkeypatch.setattr(backend, "_triton_cuda", lambda t: True)
    with torch.no_grad():
        for numel in (2048, backend.FUSE_MAX_ELEMENTS + 1):
            assert backend.resolve_elementwise_backend("auto", torch.empty(numel)) == "triton"
        assert backend.resolve_elementwise_backend("reference", torch.empty(4)) == "reference"
    assert backend.resolve_elementwise_backend("auto", torch.empty(4)) == "reference"  # autograd
    assert Backends.reference().elementwise == "reference"
    with pytest.raises(ValueError, match="elementwise"):
        Backends(elementwise="nope")


@pytest.mark.parametrize("qk_scope", ["head", "full"])
def test_model_forward_with_triton_elementwise_matches_reference(qk_scope):
    """A Qwen3-like model (q/k norm per head, RoPE) and an OLMoE-like one (q/k norm over the
    whole projection): the forward with the Triton kernels matches plain torch."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                      n_kv_heads=2, head_dim=8, max_seq_len=16, qk_norm=True,
                      qk_norm_scope=qk_scope, moe_kind="moe", moe_every=1, num_experts=4,
                      expert_d_ff=16, router=RouterConfig(top_k=2, dropless=True))
    model = Transformer(cfg, backends=Backends.reference()).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    with torch.no_grad():
        ref = model(ids, inference=True).logits
        model.set_backends(Backends(fuse="reference", elementwise="triton"))
        got = model(ids, inference=True).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K,dtype", [(1, torch.float32), (3, torch.float32)]
                         + ([(8, torch.bfloat16)] if ON_GPU else []))
def test_add_combine_norm_equals_combine_then_add_norm(K, dtype):
    """The MoE combine done inside the residual add + RMSNorm pass gives the bits of the combine
    kernel followed by the add + norm kernel: s, y equal; dropped assignments (kept False, their
    rows parked) add nothing."""
    from moeflow.ops.norm_triton import add_combine_rms_norm_triton
    from moeflow.ops.permute_triton import combine_triton

    torch.manual_seed(K)
    B, T, D = 2, 5, 48
    N = B * T * K + 3  # three parked rows past the kept ones
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    y_ND = torch.randn(N, D, device=DEVICE).to(dtype)
    row_TK = torch.randperm(N, device=DEVICE)[:B * T * K].view(B * T, K)
    w_TK = torch.rand(B * T, K, device=DEVICE)
    kept_TK = torch.rand(B * T, K, device=DEVICE) > 0.25
    weight = torch.randn(D, device=DEVICE)
    h = combine_triton(y_ND, w_TK, row_TK, kept_TK).view(B, T, D)
    s_ref, y_ref = add_rms_norm_triton(x, h, weight, 1e-6)
    s, y = add_combine_rms_norm_triton(x, y_ND, row_TK, w_TK, kept_TK, weight, 1e-6)
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    assert not torch.equal(s, x + combine_triton(y_ND, w_TK, row_TK, torch.ones_like(kept_TK))
                           .view(B, T, D))  # the dropped ones did not count
    with pytest.raises(ValueError, match="add_combine_rms_norm"):
        add_combine_rms_norm_triton(x[:, :4], y_ND, row_TK, w_TK, kept_TK, weight, 1e-6)


def test_model_defers_each_moe_combine_to_the_next_norm(monkeypatch):
    """Without autograd, with the Triton combine and norms, each MoE layer's combine runs in
    the next add + norm (the last one's in the final norm): the logits equal the ones of the
    same model run block by block (a forward hook turns the deferral off) bit for bit."""
    from moeflow.ops import norm_triton

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=64, n_layers=3, d_model=32, n_heads=4,
                      n_kv_heads=2, head_dim=8, max_seq_len=16, qk_norm=True,
                      moe_kind="moe", moe_every=1, num_experts=4, expert_d_ff=16,
                      router=RouterConfig(top_k=2, dropless=True))
    model = Transformer(cfg, backends=Backends(fuse="reference", elementwise="triton",
                                               dispatch="triton")).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    calls = []
    fused = norm_triton.add_combine_rms_norm_triton
    monkeypatch.setattr(norm_triton, "add_combine_rms_norm_triton",
                        lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        got = model(ids, inference=True).logits
        assert len(calls) == cfg.n_layers  # two blocks' first norms and the final norm
        handle = model.blocks[0].register_forward_hook(lambda *a: None)
        want = model(ids, inference=True).logits
        handle.remove()
    assert len(calls) == cfg.n_layers
    assert torch.equal(got, want)


def test_add_norm_refuses_a_residual_of_another_shape_or_dtype():
    """add_rms_norm_triton and the pending pass the router's kernel takes (PendingAddNorm.of)
    stop with one line naming both operands, before anything is allocated or launched."""
    from moeflow.ops.norm_triton import PendingAddNorm
    x, w = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    for h in (torch.randn(2, 4, device=DEVICE), x.double()):
        for fn in (add_rms_norm_triton, PendingAddNorm.of):
            with pytest.raises(ValueError, match="add_rms_norm: residual .* does not match "
                                                 r"\(2, 8\) torch.float32"):
                fn(x, h, w, 1e-6)
