"""Experts packed losslessly to 12 bits per bf16 weight (expert_store="packed"): the packing is
bit-exact (special values included), the Triton unpack equals the reference, and the offloaded
engine gives the same greedy tokens and bit-identical logits as with the pinned store under
forced evictions, copying about 3/4 of the bytes; one-line errors for what cannot be packed."""

import copy

import pytest
import torch

from moeflow.infer import Engine, EngineConfig
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.expert_store import LayerExperts
from moeflow.infer.offload.packed_store import PackedExpertStore
from moeflow.model.experts import Experts
from moeflow.ops.bf16_pack import (MAX_EXCEPTION_SHARE, PackedLayout, pack_bf16,
                                   unpack_bf16_reference)
from tests._triton_cpu import DEVICE, ON_GPU, TRITON  # noqa: I001  (sets TRITON_INTERPRET first)
from test_offload import KINDS, budget_for, make_model, prompts, run
from test_offload_mmap import _cli, saved_mixtral

SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-39, 3.3e38, -1.0]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def unpacked(buf, layout, like):
    out = torch.empty_like(like)
    unpack_bf16_reference(buf, layout, out)
    return out


@pytest.mark.parametrize("scale,n", [(0.02, 4097), (1.0, 3000), (1e-30, 2600), (300.0, 2311)])
def test_packing_is_bit_exact_and_takes_three_quarters(scale, n):
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * scale).bfloat16()
    t[:len(SPECIAL)] = torch.tensor(SPECIAL).bfloat16()
    buf, layout = pack_bf16(t)
    assert torch.equal(bits(unpacked(buf, layout, t)), bits(t))
    # the specials are exceptions (or, for some, inside the window): a handful at most
    assert layout.k <= len(SPECIAL) + n // 1000
    assert buf.numel() <= 0.75 * 2 * n + 6 * layout.k + 20


def test_a_tensor_of_exceptions_stays_raw_and_zeros_pack():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-2**15, 2**15, (4096,), dtype=torch.int32, generator=g)
    assert pack_bf16(noise.to(torch.int16).view(torch.bfloat16)) is None  # 256 exponents used
    zeros = torch.zeros(3, 5, dtype=torch.bfloat16)
    buf, layout = pack_bf16(zeros)
    assert layout.k == 0 and torch.equal(bits(unpacked(buf, layout, zeros)), bits(zeros))
    # just at the limit: one exception per MAX_EXCEPTION_SHARE values packs, one more does not
    n = 4 * MAX_EXCEPTION_SHARE
    t = torch.full((n,), 0.5, dtype=torch.bfloat16)
    t[:4] = 2.0 ** -100
    assert pack_bf16(t)[1].k == 4
    t[4] = 2.0 ** -100
    assert pack_bf16(t) is None
    with pytest.raises(ValueError, match="bfloat16"):
        pack_bf16(torch.zeros(4))


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_unpack_equals_the_reference():
    from moeflow.ops.bf16_unpack_triton import unpack_bf16_triton
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(8001, generator=g) * 0.05).bfloat16()
    t[::800] = torch.tensor(SPECIAL[:1] * 11).bfloat16()  # exceptions spread over blocks
    t[7:7 + len(SPECIAL)] = torch.tensor(SPECIAL).bfloat16()
    buf, layout = pack_bf16(t)
    assert layout.k > 10
    out = torch.full_like(t, 7.0, device=DEVICE)
    unpack_bf16_triton(buf.to(DEVICE), layout, out)
    assert torch.equal(bits(out).cpu(), bits(t))


def pinned_and_packed(kind: str, device: str, seed: int):
    """{store: (engine, tokens, logits)} for a bf16 `kind` model offloaded to `device` with
    top_k + 1 slots, once per store."""
    model = make_model(kind).bfloat16()
    ps = prompts(2, seed=seed)
    slots = model.config.router.top_k + 1
    out = {}
    for store in ("pinned", "packed"):
        offload = OffloadConfig(device=device, expert_store=store, gpu_memory=budget_for(
            model, slots, 2, expert_store=store))
        out[store] = run(copy.deepcopy(model), ps, max_batch_size=2, offload=offload)
    return out, slots


def assert_same_logits(a: dict, b: dict) -> None:
    for rid, rows in a.items():
        assert all(torch.equal(x, y) for x, y in zip(b[rid], rows, strict=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_engine_equals_pinned_engine_under_evictions(kind):
    out, slots = pinned_and_packed(kind, "cpu", seed=len(kind) + 3)
    (pinned, tokens, logits), (packed, tokens_p, logits_p) = out["pinned"], out["packed"]
    assert packed.offload.plan.slots == slots and packed.offload.plan.staging > 0
    assert isinstance(packed.offload.cache.store, PackedExpertStore)
    assert tokens_p == tokens
    assert_same_logits(logits, logits_p)
    a, b = pinned.stats().offload.cache, packed.stats().offload.cache
    assert a.copies == b.copies > slots
    assert b.bytes_copied < 0.8 * a.bytes_copied  # weights packed; biases (pr_moe) raw


def test_what_cannot_be_packed_is_one_line():
    model = make_model("mixtral")  # float32
    with pytest.raises(ValueError, match=r"packs bfloat16 experts; this model's are "
                                         r"torch.float32"):
        Engine(model, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory="1GiB", expert_store="packed")))
    assert all(isinstance(m.experts, Experts) for m in model.moe_layers())  # nothing moved
    with pytest.raises(ValueError, match="cpu_experts='split' with expert_store='packed'"):
        OffloadConfig(gpu_memory="1GiB", expert_store="packed", cpu_experts="split")


def test_packed_store_serves_the_cpu_paths_unpacked():
    """expert(layer, e), which CPU compute for misses reads, gives the original tensors."""
    g = torch.Generator().manual_seed(2)
    w_in = (torch.randn(3, 8, 12, generator=g) * 0.1).bfloat16()
    w_out = (torch.randn(3, 6, 8, generator=g) * 0.1).bfloat16()
    w_out[1] = torch.randint(-2**15, 2**15, (6, 8), generator=g).to(torch.int16).view(
        torch.bfloat16)  # stays raw
    b_in = torch.randn(3, 12, generator=g).bfloat16()
    store = PackedExpertStore(torch.device("cpu"), LayerExperts(w_in, w_out, b_in, None))
    assert store.add_layer(w_in, w_out, b_in, None) == 0
    assert store.packed_tensors == 5 and store.raw_tensors == 4
    assert store.unpacked_bytes == 2 * (w_in.numel() + w_out.numel() + b_in.numel())
    assert store.total_bytes < store.unpacked_bytes
    for e in range(3):
        got = store.expert(0, e)
        assert got[3] is None
        for x, want in zip(got[:3], (w_in[e], w_out[e], b_in[e])):
            assert torch.equal(bits(x), bits(want))
    assert isinstance(store.experts[0][0].sections[0].layout, PackedLayout)


@pytest.mark.skipif(not ON_GPU, reason="the staging buffer and copy stream exist on CUDA")
def test_packed_engine_on_cuda_equals_pinned_engine():
    out, _ = pinned_and_packed("mixtral", "cuda", seed=5)
    assert out["packed"][0].offload.cache.store.staging.is_cuda
    assert out["packed"][1] == out["pinned"][1]
    assert_same_logits(out["pinned"][2], out["packed"][2])


def test_generate_cli_with_expert_store_packed_gives_the_bf16_resident_text(tmp_path):
    """`generate --dtype bfloat16 --gpu-memory ... --expert-store packed` = the bf16 resident
    engine's text; a float32 checkpoint without --dtype is one line naming the fix."""
    model, base = saved_mixtral(tmp_path)
    rc, resident, err = _cli(*base, "--dtype", "bfloat16")
    assert rc == 0, err
    budget = budget_for(model.bfloat16(), model.config.router.top_k + 1, max_batch_size=1,
                        expert_store="packed")
    packed = ("--gpu-memory", budget, "--expert-store", "packed")
    assert _cli(*base, "--dtype", "bfloat16", *packed) == (0, resident, "")
    rc, _, err = _cli(*base, *packed)
    assert rc == 2 and err.count("\n") == 1 and "this model's are torch.float32" in err


def test_a_new_engine_reuses_the_packed_store_and_refuses_another_kind():
    out, slots = pinned_and_packed("qwen3", "cpu", seed=9)
    first, want = out["packed"][0], out["packed"][1]
    model, store = first.model, first.offload.cache.store
    ps = prompts(2, seed=9)
    del first, out
    budget = budget_for(model, slots + 1, 2, expert_store="packed")
    engine, tokens, _ = run(model, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget, expert_store="packed"))
    assert engine.offload.cache.store is store and engine.offload.plan.slots == slots + 1
    assert tokens == want
    with pytest.raises(ValueError, match="already moved this model's experts to a 'packed'"):
        Engine(model, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory=budget)))
