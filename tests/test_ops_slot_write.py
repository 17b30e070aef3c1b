"""The prefill's KV write (moeflow.ops.slot_write_triton) equals index_copy_ into the slot."""

import pytest

from tests._triton_cpu import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.ops.slot_write_triton import write_slot_triton  # noqa: E402


@pytest.mark.parametrize("T,slot", [(1, 0), (37, 2), (64, 1)])
def test_write_slot_equals_index_copy(T, slot):
    """Strided prompt tensors (views of [B, T, G, d] memory, as the norm+RoPE kernel and the
    qkv split leave them), dk != dv and not powers of two, slots other than the first: only
    [slot, :, :T] changes, to the prompt's rows."""
    N, G, M, dk, dv = 3, 2, 80, 24, 20
    torch.manual_seed(T)
    k_cache, v_cache = (torch.randn(N, G, M, d, device=DEVICE) for d in (dk, dv))
    k_BGTd = torch.randn(1, T, G, dk, device=DEVICE).transpose(1, 2)
    v_BGTd = torch.randn(1, T, G, 2 * dv, device=DEVICE)[..., :dv].transpose(1, 2)
    slot_1 = torch.tensor([slot], device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[:, :, :T].index_copy_(0, slot_1, k_BGTd)
    want_v[:, :, :T].index_copy_(0, slot_1, v_BGTd)
    write_slot_triton(k_cache, v_cache, slot_1, k_BGTd, v_BGTd)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
