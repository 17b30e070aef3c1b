"""The engine's bucketed prefill (moeflow.infer.prefill_graphs) on CPU without capture: padded
prompts give the eager prefill's tokens, logits, KV cache and expert counts."""

import pytest

from tests._triton_cpu import ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

import torch  # noqa: E402

from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.prefill_graphs import GraphPrefiller, prefill_buckets  # noqa: E402
from moeflow.infer.slot_cache import SlotKVCache, SlotPrefillView  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402
from tests.test_engine import VOCAB, make_model  # noqa: E402


def test_buckets_grow_by_at_most_half_and_end_at_the_limit():
    assert prefill_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert prefill_buckets(4096)[-4:] == [1536, 2048, 3072, 4096]
    assert prefill_buckets(10) == [10]
    for small, big in zip(prefill_buckets(4096), prefill_buckets(4096)[1:]):
        assert big <= 1.5 * small


def padded_engine(model, max_tokens, **cfg):
    engine = Engine(model, EngineConfig(**cfg))
    engine._prefiller = GraphPrefiller(engine._prefill_forward, max_tokens, engine.device,
                                       capture=False)
    return engine


@pytest.mark.parametrize("kind,attention,elementwise", [
    ("llama", "auto", "auto"), ("gpt", "auto", "auto"), ("mla", "auto", "auto"),
    ("llama", "triton", "auto"), ("llama", "triton", "triton"), ("gpt", "triton", "triton")])
def test_padded_prefill_matches_eager_prefill(kind, attention, elementwise):
    """attention="triton": the padded prefill writes its keys and values into the slot with
    moeflow.ops.slot_write_triton (Triton's interpreter on the CPU) and decode attends with
    the Triton kernel; with elementwise="triton" too, the q/k norm + RoPE kernel writes them
    instead (llama: per-head q/k norm and RoPE), except where it does not run (gpt: neither)."""
    if "triton" in (attention, elementwise):
        pytest.importorskip("triton")
        if ON_GPU:  # the model lives on the CPU: Triton runs it only through its interpreter
            pytest.skip("CPU model; the GPU runs the Triton KV write in test_engine_cuda")
    model = make_model(kind)
    model.set_backends(Backends(attention=attention, elementwise=elementwise))
    g = torch.Generator().manual_seed(3)
    # 5 and 17 tokens pad up to 16 and 24; 16 fills its bucket; 30 exceeds max_tokens (eager);
    # 17 is prefilled last.
    ps = [torch.randint(0, VOCAB, (t,), generator=g).tolist() for t in (5, 16, 30, 17)]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    runs = []
    for engine in (Engine(model, EngineConfig(max_batch_size=2)),
                   padded_engine(model, 24, max_batch_size=2)):
        seen = {}
        engine.logits_hook = lambda rid, row, seen=seen: seen.setdefault(rid, []).append(
            row.clone())
        runs.append((engine.generate(ps, params), seen, engine.stats().expert_counts, engine))
    (out_e, seen_e, counts_e, _), (out_p, seen_p, counts_p, padded) = runs
    assert out_p == out_e
    assert padded._prefiller.last_bucket == 24
    for rid in seen_e:  # the first row comes from the prefill, the rest read its KV cache
        assert len(seen_p[rid]) == len(seen_e[rid]) == 6
        for a, b in zip(seen_p[rid], seen_e[rid]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counts_p == counts_e  # padding rows are not counted


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_slot_prefill_with_the_qk_kernels_kv_write_equals_the_separate_write(kind):
    """A prompt into slot 1 through SlotPrefillView with the Triton elementwise backend: with
    the Triton attention backend the q/k kernel stores the keys and values (llama; gpt has no
    q/k norm and no RoPE, so the slot-write kernel does), with the reference one index_copy_
    does. Same cache bits, same logits; slots 0 and 2 and the positions past the prompt keep
    the random values they started with."""
    pytest.importorskip("triton")
    if ON_GPU:
        pytest.skip("CPU model; Triton runs it only through its interpreter")
    model = make_model(kind)
    ids_1T = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    runs, start = [], None
    for attention in ("triton", "reference"):
        model.set_backends(Backends(elementwise="triton", attention=attention))
        cache = SlotKVCache.for_model(model, num_slots=3, max_len=12)
        if start is None:
            start = (torch.randn_like(cache.k_LNGMd), torch.randn_like(cache.v_LNGMd))
        cache.k_LNGMd.copy_(start[0])
        cache.v_LNGMd.copy_(start[1])
        with torch.no_grad():
            logits = model(ids_1T, cache=SlotPrefillView(cache, torch.tensor([1])),
                           inference=True).logits
        runs.append((logits, cache.k_LNGMd, cache.v_LNGMd))
    (logits_f, k_f, v_f), (logits_r, k_r, v_r) = runs
    assert torch.equal(logits_f, logits_r)
    assert torch.equal(k_f, k_r) and torch.equal(v_f, v_r)
    for got, was in zip((k_f, v_f), start):
        assert not torch.equal(got[:, 1, :, :7], was[:, 1, :, :7])
        got[:, 1, :, :7] = was[:, 1, :, :7]
        assert torch.equal(got, was)


def test_prefiller_refuses_prompts_outside_its_range():
    model = make_model("llama")
    engine = padded_engine(model, 16)
    with pytest.raises(ValueError, match="outside 1..16"):
        engine._prefiller(0, list(range(17)))
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        EngineConfig(prefill_graph_tokens=0)
