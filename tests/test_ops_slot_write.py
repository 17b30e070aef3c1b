"""The prefill's KV write into a slot equals index_copy_ into it: the slot-write kernel
(moeflow.ops.slot_write_triton) and the q/k norm + RoPE kernel's own write
(moeflow.ops.qk_rope_triton.KVSlotWrite)."""

import pytest

from tests._triton_cpu import DEVICE  # noqa: I001  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import torch  # noqa: E402

from moeflow.model.rope import rope_cos_sin  # noqa: E402
from moeflow.ops import qk_rope_triton  # noqa: E402
from moeflow.ops.qk_rope_triton import KVSlotWrite  # noqa: E402
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


# (tokens, heads per program, num_warps) of the q/k kernel: tiles that divide neither the tokens
# nor the kv heads, one token per program, and the launcher's default.
QK_TILES = [(1, 4, 1), (2, 2, 2), (8, 4, 4), (qk_rope_triton.BLOCK_T, qk_rope_triton.BLOCK_H,
                                             qk_rope_triton.NUM_WARPS)]


@pytest.mark.parametrize("T,H,G,hd,norm", [(5, 4, 2, 16, True), (9, 6, 3, 32, True),
                                           (7, 4, 2, 16, False)])
def test_qk_kernel_writes_its_keys_and_the_values_into_the_slot(T, H, G, hd, norm):
    """The q/k norm + RoPE kernel with a KVSlotWrite (the engine's prefill): q and k come back
    as without it, and only rows [slot, :, :T] of the caches change, to the returned (normed,
    rotated) keys and to the values, exactly. q, k and v are head views of one qkv projection,
    as attention has them; the caches start random, so an untouched row keeps its value."""
    N, M, slot = 3, 12, 2
    torch.manual_seed(T)
    qkv = torch.randn(1, T, (H + 2 * G) * hd, device=DEVICE)
    q, k, v = qkv.split([H * hd, G * hd, G * hd], dim=-1)
    q_BHTd, k_BGTd, v_BGTd = (t.view(1, T, -1, hd).transpose(1, 2) for t in (q, k, v))
    qw = 1 + 0.1 * torch.randn(hd, device=DEVICE) if norm else None
    kw = 1 + 0.1 * torch.randn(hd, device=DEVICE) if norm else None
    cos, sin = rope_cos_sin(torch.arange(T, device=DEVICE)[None], hd, 10000.0, torch.float32)
    args = (q_BHTd, k_BGTd, qw, kw, 1e-6, cos, sin, False)
    slot_1 = torch.tensor([slot], device=DEVICE)
    outs = []  # kept alive: a tile that skips a write must not find the last tile's output
    for block_t, block_h, num_warps in QK_TILES:
        k_cache, v_cache = (torch.randn(N, G, M, hd, device=DEVICE) for _ in range(2))
        want_k, want_v = k_cache.clone(), v_cache.clone()
        tile = dict(block_t=block_t, block_h=block_h, num_warps=num_warps)
        q_want, k_want = qk_rope_triton._launch(*args, **tile)
        write = KVSlotWrite(k_cache, v_cache, slot_1, v_BGTd)
        outs.append(qk_rope_triton._launch(*args, kv_write=write, **tile))
        q_out, k_out = outs[-1]
        assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want), tile
        want_k[:, :, :T].index_copy_(0, slot_1, k_want)
        want_v[:, :, :T].index_copy_(0, slot_1, v_BGTd)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), tile


def test_qk_kernel_refuses_a_slot_write_it_cannot_do():
    T, H, G, hd = 4, 2, 1, 8
    q_BHTd, k_BGTd = torch.randn(1, H, T, hd), torch.randn(1, G, T, hd)
    v_BGTd, slot_1 = torch.randn(1, G, T, hd), torch.tensor([0])
    cache = torch.zeros(2, G, T, hd)
    args = (q_BHTd, k_BGTd, None, None, 0.0, None, None, False)
    for bad in (KVSlotWrite(cache, cache, slot_1, torch.randn(1, G, T, hd + 2)),
                KVSlotWrite(cache[:, :, :T - 1], cache, slot_1, v_BGTd),  # slot too short
                KVSlotWrite(cache, cache.double(), slot_1, v_BGTd)):
        with pytest.raises(ValueError, match="kv_write"):
            qk_rope_triton.qk_norm_rope_triton(*args, kv_write=bad)
