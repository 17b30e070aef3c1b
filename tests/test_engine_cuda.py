"""Engine on CUDA in bf16 (skipped without a GPU), measured against an fp32 reference.

Each bf16 engine (CUDA graphs, eager, plain-torch small ops) is teacher-forced along the fp32
model's greedy path: it computes and makes its own choice, then emits the reference's token, so
its logits are compared with the reference's at every step, whichever token bf16 would pick.

The bound is measured, not tuned. The same fp32 model with its weights rounded to bf16 (a
language model's only real-valued inputs are its weights) gives, along the same path, the error
that bf16 storage alone causes, err_w: a few units of bf16's roundoff u = 2^-8 (0.6-1.1e-2
here). The engine also rounds activations, at about as many points per layer as there are
weight matrices (matmul inputs and outputs, norms, attention probabilities, the residual
stream), each a relative error of the same size; independent errors add in quadrature, so its
error should be sqrt(2)..2 times err_w. Measured on an H200 over 8 model seeds x 4 prompts:
1.3-2.1 times on the mean over a prompt's steps. SLACK = 4 (twice the upper estimate) bounds
each prompt's mean; each single step is bounded by SLACK times the worst step of err_w, the size
of a near-tied router choice flipping in one model and not in the other (measured: at most 3.2
times). A decode bug gives far more: a position off by one, or a query not seeing its own key,
measured 16-31 times err_w on the mean.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.decode_graphs import GraphDecoder
from moeflow.infer.prefill_graphs import GraphPrefiller
from moeflow.ops.backend import Backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STEPS = 24
GREEDY = SamplingParams(max_new_tokens=STEPS, temperature=0)
SLACK = 4.0


def qwen_like(seed=0) -> Transformer:
    """A small Qwen3-MoE-shaped model in fp32 on the GPU, with decisive routers."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=1024, n_layers=4, d_model=256, n_heads=8,
                      n_kv_heads=2, head_dim=32, max_seq_len=512, qk_norm=True, moe_kind="moe",
                      moe_every=1, num_experts=16, expert_d_ff=128, init_std=0.05,
                      router=RouterConfig(top_k=4, dropless=True, normalize_topk=True))
    model = Transformer(cfg)
    for layer in model.moe_layers():
        torch.nn.init.normal_(layer.router.gate.weight, std=0.3)
    return model.to("cuda").eval()


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (int(t),), generator=g).tolist()
            for t in torch.randint(5, 40, (n,), generator=g)]


def bf16_weights(model: Transformer) -> Transformer:
    """A copy that computes in fp32 with every weight rounded to bf16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    return rounded


@torch.no_grad()
def greedy_path(model, prompt) -> list[int]:
    seq = list(prompt)
    for _ in range(STEPS):
        logits = model(torch.tensor([seq], device="cuda"), inference=True).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def path_logits(model, prompt, path) -> torch.Tensor:
    """[STEPS, V] fp32: the logits that predict each token of `path` (one full forward, routed
    as the engine routes)."""
    seq = torch.tensor([prompt + path[:-1]], device="cuda")
    return model(seq, inference=True).logits[0, len(prompt) - 1:].float()


class ForcedEngine(Engine):
    """Records every step's logits, samples as the engine does, then makes the given path's
    token the one it decodes next and emits instead (every request runs len(path) steps, so
    no row is sampled past its path)."""

    def __init__(self, model, config, paths: dict[str, list[int]]):
        super().__init__(model, config)
        self.paths = paths
        self.rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in paths}
        self.logits_hook = lambda rid, row_V: self.rows[rid].append(row_V.float().clone())

    def _sample(self, requests, logits_BV, greedy_B, first_slot, published=None, graphs=None):
        super()._sample(requests, logits_BV, greedy_B, first_slot)
        forced = [self.paths[r.request_id][len(self.rows[r.request_id]) - 1] for r in requests]
        return self.next_tokens.record(first_slot, torch.tensor(forced, device=self.device),
                                       requests)


def forced_logits(engine: ForcedEngine, ps) -> list[torch.Tensor]:
    for rid, p in zip(engine.paths, ps):
        engine.add_request(p, GREEDY, request_id=rid)
    while engine.has_work():
        engine.step()
    return [torch.stack(engine.rows[rid]) for rid in engine.paths]


def rel_err_S(a_SV, ref_SV) -> torch.Tensor:
    return (a_SV - ref_SV).norm(dim=-1) / ref_SV.norm(dim=-1)


def make_reference(seed=0, n_prompts=4):
    """The fp32 model, prompts, the model's greedy paths, its logits along them and err_w
    (per prompt, per step), all computed with the plain-torch small ops."""
    model = qwen_like(seed)
    model.set_backends(Backends(fuse="reference"))
    ps = prompts(n_prompts, seed=seed + 1)
    paths = [greedy_path(model, p) for p in ps]
    ref = [path_logits(model, p, path) for p, path in zip(ps, paths)]
    rounded = bf16_weights(model)
    err_w = [rel_err_S(path_logits(rounded, p, path), r) for p, path, r in zip(ps, paths, ref)]
    model.set_backends(Backends())
    return model, ps, paths, ref, err_w


@pytest.fixture(scope="module")
def reference():
    return make_reference()


VARIANT_BACKENDS = {"unfused": Backends(fuse="reference"),
                    # the one-pass Triton norms and q/k norm + RoPE at every size (auto picks
                    # them only above FUSE_MAX_ELEMENTS, which these prompts never reach)
                    "triton_elementwise": Backends(elementwise="triton"),
                    # decode attention in plain torch (scatters + compiled twin) instead of the
                    # Triton kernel "auto" picks on CUDA (moeflow.ops.decode_attention_triton)
                    "reference_attention": Backends(attention="reference")}


@pytest.mark.parametrize("variant", ["graphs", "eager", "unfused", "no_prefill_graphs",
                                     "triton_elementwise", "reference_attention"])
def test_bf16_engine_matches_fp32_within_bf16_rounding(reference, variant):
    model32, ps, paths, ref, err_w = reference
    model = copy.deepcopy(model32).bfloat16()
    model.set_backends(VARIANT_BACKENDS.get(variant, Backends()))
    engine = ForcedEngine(model,
                          EngineConfig(max_batch_size=4, cuda_graphs=variant != "eager",
                                       prefill_graphs=variant != "no_prefill_graphs"),
                          {f"p{i}": path for i, path in enumerate(paths)})
    got = forced_logits(engine, ps)
    assert isinstance(engine._decoder, GraphDecoder) == (variant != "eager")
    if variant != "eager":
        assert len(engine._decoder.graphs) >= 1
    prefill_graphs = variant not in ("eager", "no_prefill_graphs")
    assert (engine._prefiller is not None) == prefill_graphs
    if prefill_graphs:
        assert len(engine._prefiller.graphs) >= 1
    worst_w = max(float(w.max()) for w in err_w)
    assert sum(float(w.mean()) for w in err_w) / len(err_w) < 8 * 2**-8  # a bf16-sized yardstick
    for i, (g, r, w) in enumerate(zip(got, ref, err_w)):
        assert g.shape == r.shape == (STEPS, model32.config.vocab_size)
        err = rel_err_S(g, r)
        print(f"{variant} prompt {i}: relative logit error mean {err.mean():.2e} max "
              f"{err.max():.2e}; bf16 weights alone mean {w.mean():.2e} max {w.max():.2e}")
        assert err.mean() <= SLACK * w.mean(), (i, err.tolist(), w.tolist())
        assert err.max() <= SLACK * worst_w, (i, err.tolist(), worst_w)


def test_graph_replay_equals_uncaptured_step():
    model = qwen_like().bfloat16()
    runs = []
    for capture in (False, True):
        engine = Engine(model, EngineConfig(max_batch_size=4))
        engine._decoder = engine._graph_decoder(capture=capture)
        seen = {}
        engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.float().clone())
        outs = engine.generate(prompts(3, seed=2), GREEDY)
        runs.append((outs, seen, engine.stats().expert_counts))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys() and len(runs[0][1]) == 3
    for rid in runs[0][1]:
        assert len(runs[0][1][rid]) == len(runs[1][1][rid]) == STEPS
        for a, b in zip(runs[0][1][rid], runs[1][1][rid]):
            assert torch.equal(a, b)
    assert runs[0][2] == runs[1][2]


def test_pipelined_decode_equals_one_step_at_a_time_bit_for_bit():
    """CUDA graphs with the host running a step ahead of the GPU (pipelined decode: the next
    step launched before this one's tokens are read, its inputs staged while the GPU works)
    against one step at a time. Five requests through three slots, all of one length, so both
    engines run the same batches and graphs: tokens, logits and expert counts must be equal."""
    model = qwen_like().bfloat16()
    runs = []
    for pipelined in (False, True):
        engine = Engine(model, EngineConfig(max_batch_size=3, pipelined_decode=pipelined))
        assert isinstance(engine._decoder, GraphDecoder)
        seen = {}
        engine.logits_hook = lambda rid, row, seen=seen: seen.setdefault(rid, []).append(
            row.float().clone())
        runs.append((engine.generate(prompts(5, seed=6), GREEDY), seen,
                     engine.stats().expert_counts))
    (out_a, seen_a, counts_a), (out_b, seen_b, counts_b) = runs
    assert out_a == out_b and counts_a == counts_b
    assert seen_a.keys() == seen_b.keys() and len(seen_a) == 5
    for rid in seen_a:
        for a, b in zip(seen_a[rid], seen_b[rid], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("elementwise", ["auto", "triton"])
def test_graph_prefill_equals_padded_prefill_and_matches_eager(elementwise):
    """Captured prefill = the same padded forward uncaptured, bit for bit (tokens, logits,
    expert counts). Against the eager (unpadded) prefill, teacher-forced along the captured
    run's tokens: the same greedy token after every prefill, logits within bf16 rounding
    (padding changes the expert kernels' row buckets, hence their summation order)."""
    model = qwen_like().bfloat16()
    model.set_backends(Backends(elementwise=elementwise))
    # Prompts of 5-40 tokens run the weight-streaming experts; one of 128 tokens fills its
    # bucket and runs torch._grouped_mm (512 rows > 16 per expert), captured too.
    ps = prompts(4, seed=3) + [list(range(1, 129))]
    runs = {}
    for name in ("captured", "uncaptured"):
        engine = Engine(model, EngineConfig(max_batch_size=4))
        if name == "uncaptured":
            engine._prefiller = GraphPrefiller(engine._prefill_forward,
                                               engine._prefiller.max_tokens, engine.device,
                                               capture=False)
        seen = {}
        engine.logits_hook = lambda rid, row, seen=seen: seen.setdefault(rid, []).append(
            row.float().clone())
        runs[name] = (engine.generate(ps, GREEDY), seen, engine.stats().expert_counts)
        if name == "captured":
            assert len(engine._prefiller.graphs) >= 2
    (out_c, seen_c, counts_c), (out_u, seen_u, counts_u) = runs["captured"], runs["uncaptured"]
    assert out_c == out_u and counts_c == counts_u
    for rid in seen_c:
        for a, b in zip(seen_c[rid], seen_u[rid], strict=True):
            assert torch.equal(a, b)
    eager = ForcedEngine(model, EngineConfig(max_batch_size=4, prefill_graphs=False),
                         {f"p{i}": path for i, path in enumerate(out_c)})
    assert eager._prefiller is None
    got = forced_logits(eager, ps)
    for i, rows in enumerate(got):
        captured = torch.stack(seen_c[f"req-{i}"])
        assert int(rows[0].argmax()) == int(captured[0].argmax()) == out_c[i][0]
        err = rel_err_S(captured, rows)
        assert float(err.mean()) < 2e-2 and float(err.max()) < 0.15, err.tolist()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9), (0, 0.9)])
def test_sampled_tokens_are_the_reference_draws_of_the_logits_the_engine_saw(top_k, top_p,
                                                                            monkeypatch):
    """Sampled requests through the captured, pipelined decode (session 39's one-launch draws:
    whole rows in tiles, top-k candidates, a sort): every emitted token is the plain-torch draw
    of the logits row the engine saw, for that request's seed and the token's position (bf16:
    ties among candidates are common, and ranked the same way in both)."""
    from moeflow.infer import sampling

    from tests.test_engine import generate_seeing_logits

    model = qwen_like().bfloat16()
    engine = Engine(model, EngineConfig(max_batch_size=3))
    ps = prompts(4, seed=7)
    params = [SamplingParams(max_new_tokens=STEPS, temperature=0.9, top_k=top_k, top_p=top_p,
                             seed=40 + i) for i in range(4)]
    ids, out, seen = generate_seeing_logits(engine, ps, params)
    assert isinstance(engine._decoder, GraphDecoder)
    monkeypatch.setattr(sampling, "_use_kernel", lambda logits: False)
    for i, rid in enumerate(ids):
        assert len(out[rid]) == STEPS
        for step, token in enumerate(out[rid]):
            want = sampling.sample_tokens(seen[rid][step][None], [params[i]], [40 + i],
                                          [len(ps[i]) + step])
            assert want.item() == token, (rid, step)


def test_greedy_tokens_reach_the_host_through_the_token_ring():
    """Greedy decode steps publish their tokens into the token ring (pinned memory the argmax
    kernel writes; nothing runs between two graphs): every emitted token is the argmax of the
    logits row the engine saw, through a first batch, benchmark-style replays under
    held_state (steps the host did not launch: the ring resynchronises), and a second batch
    whose graphs were captured mid-run (warm-ups publish too). A mixed batch (one row
    sampling) takes the copy and still emits each greedy row's argmax."""
    from tests.test_engine import generate_seeing_logits

    model = qwen_like().bfloat16()
    engine = Engine(model, EngineConfig(max_batch_size=4))
    ring = engine.next_tokens.ring
    assert ring is not None and ring.words_RN.is_pinned()

    def check(ids, out, seen, greedy):
        for rid in ids[:greedy]:
            assert out[rid] == [int(row.argmax()) for row in seen[rid]], rid

    ids, out, seen = generate_seeing_logits(engine, prompts(2, seed=3), [GREEDY] * 2)
    check(ids, out, seen, 2)
    dec = engine._decoder
    assert isinstance(dec, GraphDecoder) and len(dec.graphs) >= 1
    with dec.held_state():
        graph = dec.graphs[dec.last_key][0]
        for _ in range(3):
            graph.replay()
    graphs_before = len(dec.graphs)
    ids, out, seen = generate_seeing_logits(engine, prompts(4, seed=4), [GREEDY] * 4)
    check(ids, out, seen, 4)
    assert len(dec.graphs) > graphs_before  # a batch bucket of 4: captured mid-run
    sampled = SamplingParams(max_new_tokens=STEPS, temperature=0.8, seed=5)
    ids, out, seen = generate_seeing_logits(engine, prompts(3, seed=5), [GREEDY] * 2 + [sampled])
    check(ids, out, seen, 2)
    assert len(out[ids[2]]) == STEPS


def test_replayed_draws_of_a_changing_mix_are_the_reference_draws(monkeypatch):
    """The decode steps' draws replayed from CUDA graphs (moeflow.infer.sampler_graphs) while
    the batch's mix changes: requests of every kind (greedy, a temperature alone, top-k, top-p,
    both) with different lengths, so that rows finish, queued requests join and the draw's shape
    moves several times. Every emitted token is the plain-torch draw of the logits row the
    engine saw for its seed and position (a graph replaying a stale table, or another shape's,
    would draw for the wrong key), and draws were captured and replayed."""
    from moeflow.infer import sampling

    from tests.test_engine import generate_seeing_logits

    model = qwen_like().bfloat16()
    engine = Engine(model, EngineConfig(max_batch_size=4))
    kinds = [dict(temperature=0), dict(temperature=0.9), dict(temperature=0.8, top_k=7),
             dict(temperature=1.1, top_p=0.7), dict(temperature=0.7, top_k=30, top_p=0.9)]
    ps = prompts(7, seed=11)
    params = [SamplingParams(max_new_tokens=(6, 20, 11, 16, 9, 14, 13)[i], seed=60 + i,
                             **kinds[i % len(kinds)]) for i in range(len(ps))]
    ids, out, seen = generate_seeing_logits(engine, ps, params)
    graphs = engine._sampler_graphs
    assert graphs.captures >= 2 and graphs.replays >= 10, (graphs.captures, graphs.replays)
    monkeypatch.setattr(sampling, "_use_kernel", lambda logits: False)
    for i, rid in enumerate(ids):
        assert len(out[rid]) == params[i].max_new_tokens
        for step, token in enumerate(out[rid]):
            want = sampling.sample_tokens(seen[rid][step][None], [params[i]], [params[i].seed],
                                          [len(ps[i]) + step])
            assert want.item() == token, (rid, step)
