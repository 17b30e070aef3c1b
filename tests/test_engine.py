"""Serving engine on CPU: decode equals a full forward, batch invariance, joining/leaving,
abort, stops, stats, and input validation."""

import pytest
import torch

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.config import MLAConfig
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.decode_graphs import warm_up

VOCAB = 101

CONFIGS = {
    # Qwen3-like: GQA, per-head qk norm, SwiGLU experts top-2 renormalised, a shared expert.
    "llama": dict(arch="llama", n_kv_heads=2, qk_norm=True, moe_kind="moe", moe_every=1,
                  num_experts=8, expert_d_ff=24, num_shared_experts=1,
                  router=RouterConfig(top_k=2, dropless=True, normalize_topk=True)),
    # DeepSpeed-MoE paper: learned positions, Residual-MoE, top-1.
    "gpt": dict(arch="gpt", n_layers=4, moe_every=2, num_experts=(4, 8), moe_kind="residual_moe",
                router=RouterConfig(top_k=1, dropless=True)),
    # DeepSeek-like: MLA, sigmoid scores with expert bias, grouped top-k.
    "mla": dict(arch="llama", n_kv_heads=4, moe_kind="moe", moe_every=1, num_experts=8,
                expert_d_ff=16, mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16,
                                              qk_nope_head_dim=8, qk_rope_head_dim=4,
                                              v_head_dim=8),
                router=RouterConfig(top_k=2, dropless=True, score_func="sigmoid",
                                    expert_bias=True, num_groups=4, topk_groups=2)),
    # Drops at eval capacity and adds router noise in training: the engine must route neither way.
    "capped": dict(arch="llama", n_kv_heads=2, moe_kind="moe", moe_every=1, num_experts=8,
                   expert_d_ff=24, router=RouterConfig(top_k=2, capacity_factor=0.25,
                                                       eval_capacity_factor=0.25, min_capacity=1,
                                                       noise="jitter", noise_eps=0.5)),
}


def make_model(kind="llama", seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, n_layers=3, d_model=32, n_heads=4,
                                max_seq_len=48, init_std=0.1), **CONFIGS[kind]})
    model = Transformer(cfg)
    for layer in model.moe_layers():  # make routing depend on the input, not on ties
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.normal_(0, 0.05)
    return model.eval()


def prompts(n, seed=1, lo=3, hi=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (t,), generator=g).tolist() for t in lengths]


def run_alone(model, prompt, params, **cfg):
    return Engine(model, EngineConfig(**cfg)).generate([prompt], params)[0]


GREEDY = SamplingParams(max_new_tokens=10, temperature=0)


@pytest.mark.parametrize("kind", ["llama", "gpt", "mla"])
def test_greedy_decode_equals_full_forward_at_every_step(kind):
    model = make_model(kind)
    engine = Engine(model, EngineConfig(max_batch_size=3))
    seen: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    ps = prompts(3, seed=2)
    outs = engine.generate(ps, GREEDY)
    for i, (prompt, out) in enumerate(zip(ps, outs)):
        assert len(out) == GREEDY.max_new_tokens
        rows = seen[f"req-{i}"]
        full = model(torch.tensor([prompt + out])).logits[0]
        for step, row in enumerate(rows):
            ref = full[len(prompt) - 1 + step]
            torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
            assert int(ref.argmax()) == out[step]


def test_engine_routes_dropless_and_leaves_the_model_as_it_was():
    """The engine passes inference=True to its forwards instead of changing the model: on a
    model left in training mode (a trainer's), it equals the full forward with inference=True,
    the model stays in training mode, and the model's own forwards still drop tokens."""
    model = make_model("capped").train()
    engine = Engine(model, EngineConfig(max_batch_size=3))
    seen: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    ps = prompts(3, seed=8)
    outs = engine.generate(ps, GREEDY)
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        for i, (prompt, out) in enumerate(zip(ps, outs)):
            ids = torch.tensor([prompt + out])
            full = model(ids, inference=True).logits[0, len(prompt) - 1:-1]
            torch.testing.assert_close(torch.stack(seen[f"req-{i}"]), full, rtol=1e-4,
                                       atol=1e-4)
            assert full.argmax(-1).tolist() == out
        model.eval()
        assert torch.equal(model(ids, inference=True).logits[0, len(prompt) - 1:-1], full)
        capped = model(ids)
        assert capped.dropped_fraction > 0
        assert not torch.allclose(capped.logits[0, len(prompt) - 1:-1], full, atol=1e-3)


def test_batch_invariance_greedy_and_seeded_sampling():
    model = make_model("llama")
    ps = prompts(4, seed=3)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    for params in (GREEDY, sampled):
        batched = Engine(model, EngineConfig(max_batch_size=4)).generate(ps, params)
        alone = [run_alone(model, p, params, max_batch_size=1) for p in ps]
        assert batched == alone
    # a different seed changes a sampled continuation (the generator is really used)
    other = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95, seed=8)
    assert run_alone(model, ps[0], other) != run_alone(model, ps[0], sampled)


def generate_seeing_logits(engine, ps, params):
    """Run prompts ps (params[i] each) to the end: their request ids, each one's tokens, and the
    logits rows the engine sampled them from (its logits_hook)."""
    seen: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    ids = [engine.add_request(p, q) for p, q in zip(ps, params)]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                out[event.request_id].append(event.token_id)
    return ids, out, seen


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_sampled_token_is_the_draw_for_its_seed_and_its_position(pipelined):
    """Each emitted token of sampled requests (mixed parameters, one greedy batch-mate) is
    sample_tokens' draw of the logits row the engine saw, under the request's seed, at the
    token's index in its sequence (prompt length + tokens before it): the engine's
    bookkeeping of positions, pipelined or not."""
    from moeflow.infer.sampling import sample_tokens

    model = make_model("llama")
    engine = Engine(model, EngineConfig(max_batch_size=3, pipelined_decode=pipelined))
    ps = prompts(4, seed=9)
    params = [SamplingParams(max_new_tokens=6, temperature=1.2, seed=3),
              SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9, seed=4),
              GREEDY, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.8, seed=5)]
    ids, out, seen = generate_seeing_logits(engine, ps, params)
    for prompt, q, rid in zip(ps, params, ids):
        want = [sample_tokens(row[None], [q], [q.seed or 0], [len(prompt) + step]).item()
                for step, row in enumerate(seen[rid])]
        assert out[rid] == want[:len(out[rid])] and len(out[rid]) == q.max_new_tokens
    assert len(set(map(tuple, out.values()))) == 4


@pytest.mark.parametrize("padded", [False, True])
def test_requests_joining_and_leaving_mid_batch_match_alone(padded):
    model = make_model("llama")
    engine = Engine(model, EngineConfig(max_batch_size=3))
    if padded:  # the CUDA-graph bucketing (padding rows into free slots), without capture
        engine._decoder = engine._graph_decoder(capture=False)
    ps = prompts(6, seed=4)
    lengths = [3, 9, 5, 1, 7, 4]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0))
           for p, n in zip(ps[:4], lengths[:4])]
    got: dict[str, list[int]] = {i: [] for i in ids}
    occupancy = []
    for step in range(40):
        if step == 2:  # join while others are running
            ids += [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0))
                    for p, n in zip(ps[4:], lengths[4:])]
            got.update({i: [] for i in ids[4:]})
        for ev in engine.step():
            got[ev.request_id].append(ev.token_id)
            assert ev.finished == (len(got[ev.request_id]) == lengths[ids.index(ev.request_id)])
        occupancy.append(engine.stats().running)
        if not engine.has_work():
            break
    assert max(occupancy) == 3 and not engine.has_work()
    for i, p, n in zip(ids, ps, lengths):
        assert got[i] == run_alone(model, p, SamplingParams(max_new_tokens=n, temperature=0))


def test_abort_frees_cache_and_reports_once():
    model = make_model("llama")
    engine = Engine(model, EngineConfig(max_batch_size=2))
    ps = prompts(3, seed=5)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    a, b, c = (engine.add_request(p, params) for p in ps)
    engine.step()
    engine.step()
    before = engine.stats()
    assert (before.running, before.waiting) == (2, 1)
    engine.abort(a)
    engine.abort(c)  # still waiting
    engine.abort("nope")  # unknown: no-op
    after = engine.stats()
    assert (after.running, after.waiting) == (1, 0)
    assert after.cache_used == len(ps[1]) + 1  # only b's prompt + its one decoded token remain
    events = engine.step()
    aborts = [e for e in events if e.finish_reason == "abort"]
    assert sorted(e.request_id for e in aborts) == sorted([a, c])
    assert all(e.token_id is None and e.finished for e in aborts)
    rest = [e.token_id for e in events if e.request_id == b]
    while engine.has_work():
        rest += [e.token_id for e in engine.step()]
    assert not any(e.finish_reason == "abort" for e in engine.step())
    assert engine.stats().cache_used == 0
    alone = run_alone(model, ps[1], params)
    # b kept decoding correctly after a's slot was freed; its first decoded token was in flight
    # (pipelined decode) when a was aborted, so it comes with the events after the abort.
    assert alone[1:] == rest


def test_stop_tokens_sequences_and_max_tokens():
    model = make_model("llama")
    prompt = prompts(1, seed=6)[0]
    free = run_alone(model, prompt, SamplingParams(max_new_tokens=12, temperature=0))
    stop_at = next(i for i in range(2, 12) if free[i] not in free[:i])
    engine = Engine(model, EngineConfig(max_batch_size=4))
    rids = [engine.add_request(prompt, SamplingParams(max_new_tokens=12, temperature=0, **kw))
            for kw in (dict(stop_token_ids=[free[stop_at]]),
                       dict(stop_sequences=[[free[stop_at - 1], free[stop_at]]]),
                       dict(stop_sequences=[[VOCAB - 1] * 5]))]
    last = {}
    tokens = {r: [] for r in rids}
    while engine.has_work():
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
            if ev.finished:
                last[ev.request_id] = ev.finish_reason
    assert tokens[rids[0]] == tokens[rids[1]] == free[:stop_at + 1]
    assert tokens[rids[2]] == free
    assert [last[r] for r in rids] == ["stop", "stop", "length"]


def _drive(engine, script):
    """Run `script` ({step: [(prompt, params), ...]}: requests added before that step) to the
    end; returns each request's events as (token, finish reason) and the decode calls made."""
    calls = []
    decoder = engine._decoder.__call__
    engine._decoder = lambda *a, **k: calls.append(len(a[1])) or decoder(*a, **k)
    events: dict[str, list] = {}
    step = 0
    while engine.has_work() or step <= max(script):
        for prompt, params in script.get(step, []):
            events[engine.add_request(prompt, params)] = []
        for e in engine.step():
            events[e.request_id].append((e.token_id, e.finish_reason))
        step += 1
    return events, calls


@pytest.mark.parametrize("padded", [False, True])
def test_pipelined_decode_emits_what_one_step_at_a_time_emits(padded):
    """Requests that stop on a stop token (their in-flight row is dropped), stop by length at
    different steps, sample with seeds, and join into freed slots: the pipelined engine reports
    exactly the events of the engine that decodes one step at a time, each request's tokens equal
    its tokens alone, and no decode is launched once every running request is sure to be done."""
    model = make_model("llama")
    ps = prompts(5, seed=11)
    greedy = SamplingParams(max_new_tokens=9, temperature=0)
    alone = [run_alone(model, p, greedy) for p in ps]
    stop = SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=(alone[0][2],))
    script = {0: [(ps[0], stop), (ps[1], SamplingParams(max_new_tokens=4, temperature=0)),
                  (ps[2], SamplingParams(max_new_tokens=7, temperature=0.8, seed=5))],
              2: [(ps[3], greedy)], 5: [(ps[4], SamplingParams(max_new_tokens=2, temperature=0))]}
    runs = {}
    for pipelined in (False, True):
        engine = Engine(model, EngineConfig(max_batch_size=3, pipelined_decode=pipelined))
        if padded:
            engine._decoder = engine._graph_decoder(capture=False)
        runs[pipelined] = _drive(engine, script)
        assert engine.stats().cache_used == 0 and not engine.has_work()
    (plain, plain_calls), (piped, piped_calls) = runs[False], runs[True]
    assert piped == plain
    tokens = {rid: [t for t, _ in ev] for rid, ev in piped.items()}
    rids = list(piped)
    assert tokens[rids[0]] == alone[0][:alone[0].index(alone[0][2]) + 1]
    assert piped[rids[0]][-1][1] == "stop"
    assert tokens[rids[1]] == alone[1][:4] and tokens[rids[3]] == alone[3]
    assert tokens[rids[4]] == alone[4][:2]
    # One decode row per token after the first, plus the rows dropped after a stop token: the
    # pipelined engine runs no more decode steps than one step at a time does, plus one at most
    # for each request that stopped on a stop token.
    assert sum(plain_calls) == sum(len(t) - 1 for t in tokens.values())
    assert len(piped_calls) <= len(plain_calls) + 1


def test_expert_counts_cover_every_processed_token():
    model = make_model("llama")
    engine = Engine(model, EngineConfig(max_batch_size=2))
    # padding rows must not be counted
    engine._decoder = engine._graph_decoder(capture=False)
    ps = prompts(3, seed=7)
    outs = engine.generate(ps, SamplingParams(max_new_tokens=5, temperature=0))
    processed = sum(len(p) + len(o) - 1 for p, o in zip(ps, outs))
    stats = engine.stats()
    assert len(stats.expert_counts) == 3 and all(len(c) == 8 for c in stats.expert_counts)
    assert all(sum(c) == 2 * processed for c in stats.expert_counts)
    assert stats.tokens_generated == 15 and stats.cache_capacity == 2 * 48
    # Per expert: the routing of a full forward over every processed position (each sequence
    # but its last token, which no step fed back), counted here by bincount.
    want = torch.zeros(3, 8, dtype=torch.int64)
    with torch.no_grad():
        for p, o in zip(ps, outs):
            routing = model(torch.tensor([p + o[:-1]]), inference=True).routing
            for layer, r in enumerate(routing):
                want[layer] += torch.bincount(r.ids_TK.flatten(), minlength=8)
    assert torch.tensor(stats.expert_counts).tolist() == want.tolist()


def test_a_decode_step_leaves_its_greedy_tokens_where_the_next_step_reads_them():
    """The step writes each row's argmax into the next-token buffer itself, so nothing runs
    between two replayed steps to put it there (NextTokens.record then copies nothing)."""
    engine = Engine(make_model("llama"), EngineConfig(max_batch_size=2))
    prompt = prompts(1, seed=3)[0]
    engine.add_request(prompt, SamplingParams(max_new_tokens=4, temperature=0))
    engine.step()  # the prefill: its first token goes into the slot's buffer entry
    out = engine._decoder(None, [len(prompt)])
    assert out.greedy_B.data_ptr() == engine.next_tokens.ids.data_ptr()
    assert torch.equal(engine.next_tokens.ids[:1], out.logits_BV.argmax(dim=-1))


def test_capture_warm_up_leaves_the_step_state_as_it_found_it():
    """A decode step writes its greedy tokens into its input buffer and adds to the expert
    counts; capture's warm-up runs (moeflow.infer.decode_graphs.warm_up) must leave both as
    they were, or the first replay would decode the warm-up's tokens and the counts would
    include the warm-ups."""
    tokens = torch.tensor([3, 1, 4, 1])
    counts = torch.tensor([5, 0, 2])
    inputs_seen = []

    def step(tokens_B1):
        inputs_seen.append(tokens_B1[:, 0].tolist())
        counts.add_(torch.tensor([1, 2, 3]))
        tokens_B1[:, 0] = tokens_B1[:, 0] * 2 + 1

    warm_up(step, (tokens[:3, None],), (tokens, counts), runs=3)
    assert inputs_seen == [[3, 1, 4]] * 3  # every run from the same inputs
    assert tokens.tolist() == [3, 1, 4, 1] and counts.tolist() == [5, 0, 2]


def test_a_steady_batch_copies_its_lengths_in_once():
    """The step advances each real row's length itself, so the bucketed decoder copies the
    lengths in only when the rows change (here: once, both requests running to the end
    together), and its tokens are those of the eager decoder's. held_state (for replays
    outside the decoder) puts back what a step advances."""
    model = make_model("llama")
    ps = prompts(2, seed=5)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    engine = Engine(model, EngineConfig(max_batch_size=2))
    dec = engine._decoder = engine._graph_decoder(capture=False)
    assert engine.generate(ps, params) == [run_alone(model, p, params) for p in ps]
    assert dec.copies_in == 1  # five steps of the same two rows

    engine.add_request(ps[0], params)
    engine.step()  # prefill
    engine.step()  # a decode step: lengths copied in, then advanced by the step
    held = dec.static.clone()
    with dec.held_state():
        dec.step_fn(*dec._args(*dec.last_key))
        assert not torch.equal(dec.static, held)
    assert torch.equal(dec.static, held)


def test_bad_inputs_raise_one_line_value_errors():
    engine = Engine(make_model("gpt"), EngineConfig(max_batch_size=2))
    ok = SamplingParams(max_new_tokens=4, temperature=0)
    engine.add_request([1, 2], ok, request_id="dup")
    cases = [(([], ok), "prompt_ids"), (([1, VOCAB], ok), "prompt_ids"),
             (([-1], ok), "prompt_ids"),
             (([1] * 40, SamplingParams(max_new_tokens=9)), "max_new_tokens"),
             (([1], ok, "dup"), "request_id"), (([1], {"temperature": 0}), "params")]
    for args, field in cases:
        with pytest.raises(ValueError) as err:
            engine.add_request(*args)
        msg = str(err.value)
        assert field in msg and "\n" not in msg
    for bad in (dict(max_batch_size=0), dict(max_seq_len=-3), dict(cache_tokens=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="cache_tokens"):
        Engine(make_model("gpt"), EngineConfig(cache_tokens=10))
    with pytest.raises(ValueError, match="stop_sequences"):
        SamplingParams(stop_sequences=[[]])
    with pytest.raises(RuntimeError):
        engine.generate([[1]], ok)  # "dup" is still waiting


def test_prompt_ids_must_be_integers_and_a_full_context_names_the_prompt():
    """int() would run [1, 3.7] as [1, 3], True as 1 and "5" as 5: each is refused by name;
    integer tensors and numpy-like ints are token ids."""
    engine = Engine(make_model("gpt"), EngineConfig(max_batch_size=2))
    for bad in ([1, 3.7], [True, 2], ["5"], "hello", None, [[1, 2]]):
        with pytest.raises(ValueError, match="prompt_ids") as err:
            engine.add_request(bad, GREEDY)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="prompt_ids: 48 tokens leave no room"):
        engine.add_request([1] * 48, SamplingParams(max_new_tokens=1))
    assert not engine.has_work()
    out = engine.generate([torch.tensor([5, 6, 7])], GREEDY)
    assert out == engine.generate([[5, 6, 7]], GREEDY)


def test_generate_with_a_bad_prompt_leaves_the_engine_idle():
    engine = Engine(make_model("llama"), EngineConfig(max_batch_size=2))
    good = prompts(2, seed=4)
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.generate(good + [[7, VOCAB]], GREEDY)
    with pytest.raises(ValueError, match="groups: 1 entries for 2 prompts"):
        engine.generate(good, GREEDY, groups=[None])
    assert not engine.has_work() and engine.stats().waiting == 0
    assert engine.generate(good, GREEDY) == [run_alone(engine.model, p, GREEDY) for p in good]


def test_an_aborted_id_is_reused_only_after_its_abort_event():
    """Until step() has returned a request's last event its id stays taken: a caller tracking
    requests by id must never see tokens after an "abort" under the same id."""
    engine = Engine(make_model("llama"), EngineConfig(max_batch_size=2))
    engine.add_request([1, 2, 3], GREEDY, request_id="x")
    engine.step()
    engine.abort("x")
    with pytest.raises(ValueError, match="request_id='x': already in use"):
        engine.add_request([4, 5], GREEDY, request_id="x")
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [("x", "abort")]
    engine.add_request([4, 5], GREEDY, request_id="x")
    after = []
    while engine.has_work():
        after += engine.step()
    assert [e.token_id for e in after] == run_alone(engine.model, [4, 5], GREEDY)
    assert after[-1].finish_reason == "length"


def test_sampling_params_and_stop_strings_are_checked_by_name():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)  # a torch.Generator takes < 2**63
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=5)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[1, 2.0])
    from moeflow.infer.text import generate_text
    from tests._serve_util import tiny_tokenizer
    engine = Engine(make_model("gpt"), EngineConfig(max_batch_size=1))
    with pytest.raises(ValueError, match="tuple of stop strings"):
        generate_text(engine, tiny_tokenizer(), "ab", GREEDY, stop="-s")


def test_a_refused_expert_aware_offload_engine_leaves_the_model_as_it_was():
    from moeflow.infer.offload import OffloadConfig
    model = make_model("llama")
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="expert-aware"):
        Engine(model, EngineConfig(batching="expert-aware",
                                   offload=OffloadConfig(device="cpu", gpu_memory="64GiB")))
    assert [n for n, _ in model.named_parameters()] == names
