"""The engine's bucketed prefill (moeflow.infer.prefill_graphs) on CPU without capture: padded
prompts give the eager prefill's tokens, logits, KV cache and expert counts."""

import pytest

from tests._triton_cpu import ON_GPU  # noqa: I001  (sets TRITON_INTERPRET first)

import torch  # noqa: E402

from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.prefill_graphs import GraphPrefiller, prefill_buckets  # noqa: E402
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


@pytest.mark.parametrize("kind,attention", [("llama", "auto"), ("gpt", "auto"), ("mla", "auto"),
                                            ("llama", "triton")])
def test_padded_prefill_matches_eager_prefill(kind, attention):
    """attention="triton": the padded prefill writes its keys and values into the slot with
    moeflow.ops.slot_write_triton (Triton's interpreter on the CPU) and decode attends with
    the Triton kernel."""
    if attention == "triton":
        pytest.importorskip("triton")
        if ON_GPU:  # the model lives on the CPU: Triton runs it only through its interpreter
            pytest.skip("CPU model; the GPU runs the Triton KV write in test_engine_cuda")
    model = make_model(kind)
    model.set_backends(Backends(attention=attention))
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


def test_prefiller_refuses_prompts_outside_its_range():
    model = make_model("llama")
    engine = padded_engine(model, 16)
    with pytest.raises(ValueError, match="outside 1..16"):
        engine._prefiller(0, list(range(17)))
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        EngineConfig(prefill_graph_tokens=0)
