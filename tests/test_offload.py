"""Expert offloading on CPU (streams and events are no-ops, everything else runs as on CUDA):
equality with the resident engine under forced evictions, the cache's slot bound and eviction
order, prefetch bookkeeping, the budget plan and its error."""

import copy

import pytest
import torch

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import ExpertCache, OffloadConfig, parse_size
from moeflow.infer.offload.cpu_experts import CpuExpertCosts, CpuExperts
from moeflow.infer.offload.expert_store import ExpertStore, LayerExperts
from moeflow.infer.offload.offloaded_experts import OffloadedExperts
from moeflow.infer.offload.placement import plan_offload
from moeflow.infer.offload.prefetch import PrefetchLedger
from moeflow.infer.offload.split_experts import SplitExperts, device_columns
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.model.experts import Experts
from moeflow.ops.expert_mlp import expert_mlp_reference

VOCAB = 97
KINDS = {
    # Mixtral: SwiGLU experts, top-2 of 8, no shared expert.
    "mixtral": dict(arch="llama", n_kv_heads=2, moe_kind="moe", moe_every=1, num_experts=8,
                    expert_d_ff=24, router=RouterConfig(top_k=2, dropless=True)),
    # Qwen3-MoE: per-head qk norm, renormalised top-4 of 16, a shared expert.
    "qwen3": dict(arch="llama", n_kv_heads=2, qk_norm=True, moe_kind="moe", moe_every=1,
                  num_experts=16, expert_d_ff=16, num_shared_experts=1,
                  router=RouterConfig(top_k=4, dropless=True, normalize_topk=True)),
    # The paper's PR-MoE: GPT, Residual-MoE, top-1, 4 then 8 experts (with biases).
    "pr_moe": dict(arch="gpt", n_layers=4, moe_every=2, num_experts=(4, 8),
                   moe_kind="residual_moe", router=RouterConfig(top_k=1, dropless=True)),
}
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


def make_model(kind: str, seed: int = 0) -> Transformer:
    """With pre-gate heads (random: the engine's outputs must not depend on them)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, n_layers=3, d_model=32, n_heads=4,
                                max_seq_len=40, init_std=0.1, pregate=True), **KINDS[kind]})
    model = Transformer(cfg)
    for layer in model.moe_layers():  # routing that depends on the input, not on ties
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return model.eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(t),), generator=g).tolist()
            for t in torch.randint(3, 12, (n,), generator=g)]


def budget_for(model, slots: int, max_batch_size: int, cpu_experts: str = "off",
               expert_store: str = "pinned") -> str:
    """A budget that buys exactly `slots` cache slots (the plan of an ample one, as the engine
    will compute it: max_seq_len and slot count are the engine's defaults here)."""
    max_len = model.config.max_seq_len
    kv = SlotKVCache.bytes_per_token(model) * max_batch_size * max_len
    probe = plan_offload(model, OffloadConfig(device="cpu", gpu_memory="64GiB",
                                              cpu_experts=cpu_experts,
                                              expert_store=expert_store),
                         kv, max_len, max_batch_size)
    return str(probe.fixed + slots * probe.expert)


def run(model, ps, **engine):
    engine_ = Engine(model, EngineConfig(**engine))
    seen: dict[str, list[torch.Tensor]] = {}
    engine_.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    return engine_, engine_.generate(ps, GREEDY), seen


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("policy,prefetch", [("lru", "none"), ("lfu", "router"),
                                            ("cyclic", "router"), ("cyclic", "pregate")])
def test_offloaded_engine_equals_resident_engine_under_evictions(kind, policy, prefetch):
    model = make_model(kind)
    ps = prompts(2, seed=len(kind))
    _, ref_tokens, ref_logits = run(copy.deepcopy(model), ps, max_batch_size=2)
    total = sum(m.spec.num_experts for m in model.moe_layers())
    top_k = model.config.router.top_k
    slots = top_k + 1  # far fewer than the experts: a batch of 2 needs groups and evictions
    offload = OffloadConfig(device="cpu", gpu_memory=budget_for(model, slots, max_batch_size=2),
                            expert_cache_policy=policy, prefetch=prefetch)
    engine, tokens, logits = run(copy.deepcopy(model), ps, max_batch_size=2, offload=offload)
    assert engine.offload.plan.slots == slots < total
    assert tokens == ref_tokens
    for rid, rows in ref_logits.items():
        assert len(logits[rid]) == len(rows)
        for row, ref in zip(logits[rid], rows):
            assert torch.equal(row, ref)
    stats = engine.stats().offload
    assert stats.cache.copies > slots  # evictions happened
    assert stats.cache.hits < stats.cache.lookups
    assert (stats.prefetch.predicted > 0) == (prefetch != "none")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cpu_experts", ["always", "auto"])
def test_misses_computed_on_the_cpu_give_the_resident_engines_outputs(kind, cpu_experts):
    """Fiddler's path: missed experts run on the host copy. On the CPU the same kernel runs
    on the same rows, so outputs are bitwise equal; "auto" decides from measured costs."""
    model = make_model(kind)
    ps = prompts(2, seed=5 + len(kind))
    _, ref_tokens, ref_logits = run(copy.deepcopy(model), ps, max_batch_size=2)
    top_k = model.config.router.top_k
    offload = OffloadConfig(device="cpu", gpu_memory=budget_for(model, top_k + 1, max_batch_size=2),
                            cpu_experts=cpu_experts)
    engine, tokens, logits = run(copy.deepcopy(model), ps, max_batch_size=2, offload=offload)
    assert tokens == ref_tokens
    for rid, rows in ref_logits.items():
        assert all(torch.equal(a, b) for a, b in zip(logits[rid], rows, strict=True))
    stats = engine.stats().offload
    if cpu_experts == "always":
        assert stats.cpu.experts > 0 and stats.cpu.costs is None
        # Every miss ran on the CPU: the cache copied only what the prefetch asked for.
        assert stats.cache.copies == stats.cache.prefetches
    else:
        costs = stats.cpu.costs
        assert costs.copy_s > 0 and costs.cpu_fixed_s + costs.cpu_per_row_s > 0
        assert stats.cpu.rows <= stats.cpu.experts * max(costs.max_rows, 0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_split_misses_give_the_resident_engines_tokens_and_close_logits(kind):
    """cpu_experts="split": once the cache is full, every miss is computed half by the device
    (a staged copy of its first d_ff columns) and half by the CPU worker, and the partials are
    summed. Each half sums over fewer d_ff terms, so logits differ from the resident engine's
    by rounding only (fp32 here: measured <= 5e-7 on logits of magnitude ~2, two units in the
    last place; the 1e-5 tolerance leaves margin for other BLAS builds);
    greedy tokens are the same."""
    model = make_model(kind)
    ps = prompts(2, seed=7 + len(kind))
    _, ref_tokens, ref_logits = run(copy.deepcopy(model), ps, max_batch_size=2)
    top_k = model.config.router.top_k
    offload = OffloadConfig(device="cpu", gpu_memory=budget_for(model, top_k + 1, 2, "split"),
                            cpu_experts="split")
    engine = Engine(copy.deepcopy(model), EngineConfig(max_batch_size=2, offload=offload))
    assert engine.offload.plan.slots == top_k + 1
    assert engine.offload.plan.staging == engine.offload.plan.expert
    measured = engine.offload.split.costs
    assert measured.copy_s > 0 and measured.cpu_fixed_s + measured.cpu_per_row_s > 0
    # The timing-based share would vary run to run: equal costs give every side half.
    engine.offload.split.costs = CpuExpertCosts(copy_s=1.0, cpu_fixed_s=1.0, cpu_per_row_s=0.0)
    logits: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    assert engine.generate(ps, GREEDY) == ref_tokens
    worst = 0.0
    for rid, rows in ref_logits.items():
        for a, b in zip(logits[rid], rows, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            worst = max(worst, (a - b).abs().max().item())
    assert worst > 0  # the split really ran: partial sums round differently
    stats = engine.stats().offload
    F = model.moe_layers()[-1].experts.d_ff
    assert stats.split.experts > 0 and stats.split.columns == stats.split.experts * F
    assert stats.split.cpu_columns == stats.split.experts * (F - round(F / 2))
    assert not stats.split.two_d_dma and stats.cpu.experts == 0
    # Each split copied its device half: w_in's and w_out's first F/2 columns/rows, biases.
    le, Fg = engine.offload.split.store.layers[-1], round(F / 2)
    share = sum(t[0].numel() * Fg // F for t in (le.w_in_EDI, le.w_out_EFD, le.b_in_EI)
                if t is not None) + (0 if le.b_out_ED is None else le.b_out_ED[0].numel())
    assert stats.split.bytes_copied == stats.split.experts * share * le.w_in_EDI.element_size()
    # Only misses that found no free slot were split: the cache copied the first slots' worth.
    assert stats.cache.copies == stats.cache.lookups - stats.cache.hits >= top_k + 1


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True),
                                             ("swiglu", True)])
def test_split_shares_sum_to_the_whole_expert(activation, bias):
    """The d_ff split is exact algebra: device share + CPU share = the expert, for any Fg."""
    torch.manual_seed(0)
    D, F, E, R = 8, 12, 3, 5
    I = 2 * F if activation == "swiglu" else F
    store = ExpertStore(pin=False)
    store.add_layer(torch.randn(E, D, I, dtype=torch.float64),
                    torch.randn(E, F, D, dtype=torch.float64),
                    torch.randn(E, I, dtype=torch.float64) if bias else None,
                    torch.randn(E, D, dtype=torch.float64) if bias else None)
    costs = CpuExpertCosts(copy_s=1.0, cpu_fixed_s=1.0, cpu_per_row_s=0.0)
    split = SplitExperts(store, activation, costs, torch.device("cpu"), None)
    x_RD = torch.randn(R, D, dtype=torch.float64)
    le = store.layers[0]
    for e, Fg in ((0, 1), (1, 6), (2, 11)):
        whole = expert_mlp_reference(x_RD, torch.tensor([R]), le.w_in_EDI[e:e + 1],
                                     None if le.b_in_EI is None else le.b_in_EI[e:e + 1],
                                     le.w_out_EFD[e:e + 1],
                                     None if le.b_out_ED is None else le.b_out_ED[e:e + 1],
                                     activation, False)
        (cpu_part,) = split.start_cpu(0, [(e, Fg, x_RD)]).result()
        total = split.device_share(0, e, Fg, x_RD) + cpu_part
        torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    assert split.stats(False).cpu_columns == (F - 1) + (F - 6) + (F - 11)


def test_split_share_balances_the_measured_costs():
    """f = copy / (copy + cpu): the H200's measured costs (copy 6.44 ms, CPU 10.0 ms + 0.027
    ms/row) give the CPU 39 % of Mixtral's 14336 columns at 1 row, both sides done in 3.9 ms;
    more rows make the CPU slower and its share smaller. Rounded to 128-column tiles."""
    h200 = CpuExpertCosts(copy_s=6.44e-3, cpu_fixed_s=10.0e-3, cpu_per_row_s=0.027e-3)
    Fg = device_columns(h200, 1, 14336, 128)
    assert Fg == 68 * 128
    assert (14336 - Fg) / 14336 == pytest.approx(6.44 / (6.44 + 10.027), abs=128 / 14336)
    assert device_columns(h200, 64, 14336, 128) > Fg
    assert device_columns(CpuExpertCosts(1.0, 1.0, 0.0), 1, 24, 1) == 12
    assert device_columns(CpuExpertCosts(1.0, 1e9, 0.0), 1, 24, 1) == 24  # CPU far too slow


def test_cpu_expert_rule_compares_the_measured_costs():
    costs = CpuExpertCosts(copy_s=1.0, cpu_fixed_s=0.2, cpu_per_row_s=0.1)
    cpu = CpuExperts(ExpertStore(pin=False), "gelu", "auto", costs)
    assert [cpu.prefers_cpu(n) for n in (1, 7, 8, 9)] == [True, True, False, False]
    assert costs.max_rows == 7
    assert CpuExpertCosts(1.0, 1.5, 0.0).max_rows == 0
    assert not CpuExperts(ExpertStore(pin=False), "gelu", "off", None).prefers_cpu(1)
    assert CpuExperts(ExpertStore(pin=False), "gelu", "always", None).prefers_cpu(10**6)
    with pytest.raises(ValueError, match="cpu_experts='sometimes'"):
        OffloadConfig(device="cpu", gpu_memory="1GiB", cpu_experts="sometimes")


def test_offloaded_engine_holds_no_expert_weights_and_respects_the_slot_count():
    model = make_model("mixtral")
    expert_numel = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    numel = sum(p.numel() for p in model.parameters())
    engine = Engine(model, EngineConfig(max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, 5, max_batch_size=2))))
    assert all(isinstance(m.experts, OffloadedExperts) for m in model.moe_layers())
    assert sum(p.numel() for p in model.parameters()) == numel - expert_numel
    cache = engine.offload.cache
    assert cache.w_in_SDI.shape[0] == cache.w_out_SFD.shape[0] == 5
    engine.generate(prompts(2, seed=4), GREEDY)
    assert len(cache.slot_of) == 5 and sorted(cache.slot_of.values()) == list(range(5))
    for (layer, e), s in cache.slot_of.items():  # each slot holds the expert it claims to
        assert torch.equal(cache.w_in_SDI[s], cache.store.layers[layer].w_in_EDI[e])
        assert torch.equal(cache.w_out_SFD[s], cache.store.layers[layer].w_out_EFD[e])


def _cache(num_slots: int, policy: str, layers: int = 2, experts: int = 6) -> ExpertCache:
    store = ExpertStore(pin=False)
    for layer in range(layers):
        w_in = torch.randn(experts, 4, 6) + 100 * layer
        store.add_layer(w_in, torch.randn(experts, 3, 4), None, None)
    template = LayerExperts(store.layers[0].w_in_EDI, store.layers[0].w_out_EFD, None, None)
    return ExpertCache(store, template, num_slots, torch.device("cpu"), policy)


def _use(cache: ExpertCache, layer: int, experts: list[int]) -> None:
    cache.release(cache.acquire(layer, experts))


def _evicted(cache: ExpertCache, before: set, layer: int, e: int) -> set:
    _use(cache, layer, [e])
    return before - set(cache.slot_of)


def test_lru_evicts_the_least_recently_used_expert():
    cache = _cache(3, "lru")
    for e in (0, 1, 2, 0, 0, 0):  # 0 is the most used but also the most recent
        _use(cache, 0, [e])
    assert _evicted(cache, set(cache.slot_of), 0, 3) == {(0, 1)}
    assert _evicted(cache, set(cache.slot_of), 1, 0) == {(0, 2)}
    _use(cache, 0, [0])  # 0 is now the most recent: 3 is the oldest
    assert _evicted(cache, set(cache.slot_of), 1, 1) == {(0, 3)}


def test_lfu_evicts_the_least_frequently_used_expert_with_history_and_lru_ties():
    cache = _cache(3, "lfu")
    for e in (0, 0, 0, 1, 1, 2):
        _use(cache, 0, [e])
    assert _evicted(cache, set(cache.slot_of), 0, 3) == {(0, 2)}  # 2 used once
    assert _evicted(cache, set(cache.slot_of), 0, 4) == {(0, 3)}  # tie 3/4 used once: older
    for _ in range(3):
        _use(cache, 0, [4])  # 4: 4 uses, more than 1's 2
    assert _evicted(cache, set(cache.slot_of), 0, 2) == {(0, 1)}  # 2 now has 2 uses
    # History survives eviction: 1 comes back with 3 uses, 2 has 2: 2 goes first.
    assert _evicted(cache, set(cache.slot_of), 0, 1) == {(0, 2)}


def test_cyclic_layer_order_thrashes_lru_and_lfu_but_not_cyclic():
    """Decode visits the layers cyclically. When the slots hold no more than the other layers'
    experts of one cycle (here 4 slots, 3 layers of 2 experts), LRU has evicted a layer's
    experts by the time it comes round again: 0 hits, whatever the routing; LFU too, its
    counts tie and LRU breaks the ties. "cyclic" evicts the layer whose turn comes last and
    keeps the rest: from the second step on, 4 and 2 of the 6 experts hit in alternation."""
    hits = {}
    for policy in ("lru", "lfu", "cyclic"):
        cache = _cache(4, policy, layers=3)
        for _ in range(10):
            for layer in range(3):
                _use(cache, layer, [2 * layer, 2 * layer + 1])
        hits[policy] = cache.stats().hits
    assert hits == {"lru": 0, "lfu": 0, "cyclic": 5 * 4 + 4 * 2}


def test_cyclic_evicts_the_loading_layer_then_backwards_round_the_cycle_lfu_within():
    cache = _cache(4, "cyclic", layers=3)
    _use(cache, 0, [0])
    _use(cache, 0, [0])  # (0, 0): 2 uses
    _use(cache, 0, [1])
    _use(cache, 1, [0])
    _use(cache, 2, [0])
    # Full. Layer 0 wants a third expert: its own others go first, the less used one.
    assert _evicted(cache, set(cache.slot_of), 0, 2) == {(0, 1)}
    # Layer 1 wants another: none of its own is unpinned except (1, 0), which goes.
    assert _evicted(cache, set(cache.slot_of), 1, 1) == {(1, 0)}
    # Layer 2 wants (2, 1) while holding (2, 0): the walk goes 2 (pinned), 1, then 0.
    cache.release(cache.acquire(2, [0, 1]))
    assert (1, 1) not in cache.slot_of and (2, 0) in cache.slot_of
    # Layer 1 again: layer 1 holds nothing, layer 0 is next backwards: its less used expert.
    assert _evicted(cache, set(cache.slot_of), 1, 3) == {(0, 2)}


def test_pinned_experts_are_never_evicted_and_groups_fit_the_slots():
    cache = _cache(2, "lru")
    held = cache.acquire(0, [0, 1])
    cache.prefetch(1, [0])  # every slot pinned: skipped, nothing evicted
    assert cache.stats().prefetch_skipped == 1 and set(cache.slot_of) == {(0, 0), (0, 1)}
    with pytest.raises(ValueError, match="3 experts requested at once; the cache has 2"):
        cache.acquire(0, [2, 3, 4])
    cache.release(held)
    cache.prefetch(1, [0])
    assert (1, 0) in cache.slot_of
    _use(cache, 0, [5])  # the prefetched slot stays pinned until layer 1 runs
    assert (1, 0) in cache.slot_of and (0, 1) not in cache.slot_of


def test_prefetch_bookkeeping():
    cache = _cache(4, "lru")
    cache.prefetch(1, [2, 3])
    stats = cache.stats()
    assert (stats.prefetches, stats.copies, stats.prefetch_used) == (2, 2, 0)
    slots = cache.acquire(1, [3, 4])
    stats = cache.stats()
    assert (stats.lookups, stats.hits, stats.prefetch_used, stats.copies) == (2, 1, 1, 3)
    assert torch.equal(cache.w_in_SDI[slots[0]], cache.store.layers[1].w_in_EDI[3])
    cache.release(slots)

    ledger = PrefetchLedger()
    ledger.predict(1, {2, 3})
    ledger.score(1, {3, 4, 5})
    ledger.score(1, {0})  # no pending prediction for layer 1 any more: not scored
    ledger.predict(2, {1})
    ledger.score(2, {1})
    s = ledger.stats()
    assert (s.predicted, s.needed, s.correct) == (3, 4, 2)
    assert s.recall == 0.5 and s.precision == pytest.approx(2 / 3)


def test_zero_shot_prefetch_recall_matches_the_next_routers_choices():
    """The ledger's recall equals an independent count: per forward and MoE layer l, the
    experts layer l+1's router picks for layer l's input vs those layer l+1 then uses."""
    model = make_model("qwen3")
    ps = prompts(2, seed=9)
    ref = copy.deepcopy(model)
    moe = ref.moe_layers()
    inputs, used = [], []

    def record(i):
        def hook(module, args, out):
            inputs.append((i, args[0].reshape(-1, args[0].shape[-1])))
            used.append((i, set(out[1].ids_TK.flatten().tolist())))
        return hook

    for i, layer in enumerate(moe):
        layer.register_forward_hook(record(i))
    run(ref, ps, max_batch_size=2)
    correct = needed = 0
    for k, (i, x_TD) in enumerate(inputs):  # hooks fire layer by layer: k+1 is layer i+1
        if i + 1 < len(moe):
            guess = set(moe[i + 1].router(x_TD, inference=True).ids_TK.flatten().tolist())
            truth = used[k + 1][1]
            needed += len(truth)
            correct += len(truth & guess)
    engine, _, _ = run(model, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, 6, max_batch_size=2), prefetch="router"))
    stats = engine.stats().offload.prefetch
    assert (stats.needed, stats.correct) == (needed, correct)
    assert 0 < correct < needed


def test_budget_below_the_minimum_is_one_line_naming_both_sizes_and_changes_nothing():
    model = make_model("mixtral")
    max_len = model.config.max_seq_len
    probe = plan_offload(model, OffloadConfig(device="cpu", gpu_memory="64GiB"),
                         SlotKVCache.bytes_per_token(model) * 2 * max_len, max_len, 2)
    assert probe.min_slots == 2
    too_small = probe.fixed + 2 * probe.expert - 1
    with pytest.raises(ValueError) as err:
        Engine(model, EngineConfig(max_batch_size=2,
                                   offload=OffloadConfig(device="cpu", gpu_memory=str(too_small))))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"gpu_memory={too_small:,} bytes: below the {too_small + 1:,} bytes needed" in msg
    assert f"minimal expert cache of 2 experts ({2 * probe.expert:,} bytes)" in msg
    assert all(isinstance(m.experts, Experts) for m in model.moe_layers())
    ok = Engine(model, EngineConfig(max_batch_size=2,
                                    offload=OffloadConfig(
                                        device="cpu", gpu_memory=str(too_small + 1))))
    assert ok.offload.plan.slots == 2


def test_pregate_prefetch_needs_the_models_heads():
    model = make_model("mixtral")
    plain = Transformer(model.config.replace(pregate=False))
    with pytest.raises(ValueError, match=r"prefetch='pregate': the model has no pre-gate heads; "
                                         r"fine-tune them with `moeflow train --pregate"):
        Engine(plain, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory=budget_for(plain, 4, max_batch_size=2), prefetch="pregate")))
    assert all(isinstance(m.experts, Experts) for m in plain.moe_layers())


def test_over_budget_request_is_one_line_and_running_requests_lose_nothing():
    """The KV cache is sized from the budget at start (slots x max_seq_len); a request that
    needs more than a sequence may hold is refused in one line while others run on."""
    model = make_model("mixtral")
    ps = prompts(2, seed=11)
    _, alone, _ = run(copy.deepcopy(model), ps, max_batch_size=2)
    engine = Engine(model, EngineConfig(max_batch_size=2, max_seq_len=24, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, 3, max_batch_size=2))))
    ids = [engine.add_request(p, GREEDY) for p in ps]
    out = {i: [] for i in ids}
    for _ in range(2):
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    with pytest.raises(ValueError) as err:
        engine.add_request([1] * 20, SamplingParams(max_new_tokens=5))
    assert str(err.value) == ("max_new_tokens: prompt of 20 tokens + max_new_tokens 5 exceeds "
                              "max_seq_len 24")
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    assert [out[i] for i in ids] == alone
    assert engine.stats().cache_used == 0


def test_sizes_and_config_validation():
    assert parse_size("24GiB") == 24 << 30
    assert parse_size("40GB") == 40 * 10**9
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size(" 4096 ") == parse_size(4096) == 4096
    for bad in ("lots", "12 parsecs", "-1GB", "0", ""):
        with pytest.raises(ValueError, match="gpu_memory="):
            parse_size(bad)
    with pytest.raises(ValueError, match="expert_cache_policy='fifo'"):
        OffloadConfig(device="cpu", gpu_memory="1GiB", expert_cache_policy="fifo")
    with pytest.raises(ValueError, match="prefetch='oracle'"):
        OffloadConfig(device="cpu", gpu_memory="1GiB", prefetch="oracle")
    with pytest.raises(ValueError, match="offload="):
        EngineConfig(offload="1GiB")


def test_a_new_engine_on_an_offloaded_model_reuses_its_store():
    model = make_model("mixtral")
    ps = prompts(2, seed=3)
    _, ref_tokens, _ = run(copy.deepcopy(model), ps, max_batch_size=2)
    first = Engine(model, EngineConfig(max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, 4, max_batch_size=2))))
    store = first.offload.cache.store
    del first
    engine, tokens, _ = run(model, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, 3, max_batch_size=2), expert_cache_policy="lfu"))
    assert engine.offload.cache.store is store and engine.offload.plan.slots == 3
    assert tokens == ref_tokens
