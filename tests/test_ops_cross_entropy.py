"""The cross-entropy's Triton softmax passes (moeflow.ops.cross_entropy_triton) against the plain
torch passes of moeflow.ops.linear_cross_entropy: the loss and both gradients, with an
unaligned vocabulary (the head's padded columns), ignored targets and chunks that do not divide
the tokens. Under Triton's interpreter (no GPU) in fp32: only the order of fp32 sums differs.
On a GPU also bf16 at a GPT-2-sized vocabulary."""

import pytest

from tests._triton_cpu import DEVICE, ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.ops.cross_entropy_triton import lse_and_picked, softmax_grad_  # noqa: E402
from moeflow.ops.linear_cross_entropy import VOCAB_ALIGN, linear_cross_entropy  # noqa: E402


def _loss_and_grads(kernels, dtype, N, D, V, chunk, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(DEVICE, dtype).requires_grad_(True)
    target = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    target[::5] = -100
    loss = linear_cross_entropy(h, w, target, chunk, kernels=kernels)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("V, chunk", [(61, 7), (VOCAB_ALIGN, 16), (2 * VOCAB_ALIGN + 3, 40)])
def test_kernels_match_the_plain_passes(V, chunk):
    N, D = 37, 24
    ref = _loss_and_grads(False, torch.float32, N, D, V, chunk)
    got = _loss_and_grads(True, torch.float32, N, D, V, chunk)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_columns_get_zero_gradient_in_place():
    C, V, P = 3, 10, 16
    logits = torch.randn(C, P, device=DEVICE)
    logits[:, V:] = 123.0  # padding: never part of the softmax
    target = torch.tensor([0, 9, 4], device=DEVICE)
    lse, picked = lse_and_picked(logits, V, target)
    torch.testing.assert_close(lse, torch.logsumexp(logits[:, :V], -1))
    torch.testing.assert_close(picked, logits[torch.arange(C), target])
    weight = torch.tensor([1.0, 0.5, 0.0], device=DEVICE)
    expect = (torch.softmax(logits[:, :V], -1) - torch.eye(V, device=DEVICE)[target]) \
        * weight[:, None]
    out = softmax_grad_(logits, V, lse, target, weight)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out[:, :V], expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, V:], torch.zeros(C, P - V, device=DEVICE))
    _, picked = lse_and_picked(logits, V, torch.tensor([V, -1, 4], device=DEVICE))
    assert picked[:2].isnan().all() and picked[2] == logits[2, 4]  # no read past the row
    with pytest.raises(ValueError, match="rows must be contiguous"):
        softmax_grad_(torch.zeros(P, C, device=DEVICE).t(), V, lse, target, weight)


@pytest.mark.skipif(not ON_GPU, reason="bf16 at a GPT-2 vocabulary: GPU only")
def test_bf16_gpt2_vocabulary_matches_the_plain_passes():
    ref = _loss_and_grads(False, torch.bfloat16, 1000, 256, 50257, 384, seed=1)
    got = _loss_and_grads(True, torch.bfloat16, 1000, 256, 50257, 384, seed=1)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # fp32 sums of bf16 logits
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=1e-5)  # one bf16 rounding apart
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=1e-5)
