"""The lookahead router (Read-ME, moeflow.model.lookahead; `moeflow train --lookahead`): routing
from token ids alone, through each layer's own routing code; the two training phases; the
engine's history plumbing, `--prefetch lookahead` (exactly the resident engine's outputs, recall
1) and expert-aware admission (moeflow.infer.scheduler)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.prefetch import LookaheadPrefetch, PrefetchLedger
from moeflow.infer.scheduler import Request, Scheduler
from moeflow.interop.convert import convert
from moeflow.interop.pretrained import from_pretrained, save_pretrained
from moeflow.train.checkpoint import load_for_inference
from moeflow.train.lookahead import distill_objective
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer
from tests._train_small import write_corpus
from tests.test_offload import KINDS, VOCAB, _cache, _evicted, _use, budget_for, prompts, run


def make_model(kind: str, context: int = 2, rank: int = 8, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, n_layers=3, d_model=32, n_heads=4,
                                max_seq_len=40, init_std=0.1, lookahead=context,
                                lookahead_rank=rank), **KINDS[kind]})
    model = Transformer(cfg)
    # routing that depends on the window (every position of it), not on ties
    for w in [m.router.gate.weight for m in model.moe_layers()] + (
            [model.lookahead.weight] if context else []):
        torch.nn.init.normal_(w, std=0.5)
    return model.eval()


def test_routing_depends_on_the_window_only_and_the_prediction_is_the_routing():
    model = make_model("mixtral", context=3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, inference=True)
    K = model.config.router.top_k
    full = model.lookahead_routing(ids, None)
    assert all(torch.equal(p, r.ids_TK) for p, r in zip(full, out.routing, strict=True))
    # The suffix from position 5 with its two tokens of history routes as in the whole sequence
    tail = model.lookahead_routing(ids[:, 5:], ids[:, 3:5])
    for p, r in zip(tail, out.routing, strict=True):
        assert torch.equal(p, r.ids_TK.view(2, 12, K)[:, 5:].reshape(-1, K))
    # ...and not with other history (the window is used)
    other = model.lookahead_routing(ids[:, 5:], (ids[:, 3:5] + 1) % VOCAB)
    assert any(not torch.equal(a, b) for a, b in zip(other, tail))
    with pytest.raises(ValueError, match="history: a cached forward"):
        model(ids, cache=object())


def test_own_routers_route_as_the_model_without_a_lookahead_router():
    model = make_model("qwen3")
    plain = Transformer(model.config.replace(lookahead=0, lookahead_rank=0)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("lookahead.") for k in unexpected)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = plain(ids, inference=True)
    own = model(ids, inference=True, own_routers=True)
    assert torch.equal(own.logits, ref.logits)
    routed = model(ids, inference=True)
    assert not torch.equal(routed.logits, ref.logits)


@pytest.mark.parametrize("rank", [0, 16])
def test_init_from_routers_starts_at_the_gates_on_the_token_embedding(rank):
    model = make_model("mixtral", context=2, rank=rank)
    moe = model.moe_layers()
    model.lookahead.init_from_routers([m.router for m in moe])
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    x_TD = F.rms_norm(model.tok_emb(ids).reshape(-1, 32), (32,), eps=1e-6)
    hist = torch.randint(0, VOCAB, (3, 1), generator=torch.Generator().manual_seed(3))
    for pred, m in zip(model.lookahead_routing(ids, hist), moe, strict=True):
        assert torch.equal(pred, m.router(x_TD, inference=True).ids_TK)


def test_config_and_flag_errors():
    base = ModelConfig.from_name("tiny")
    with pytest.raises(ValueError, match="lookahead_rank"):
        base.replace(lookahead_rank=8)
    with pytest.raises(ValueError, match="lookahead=2.*pregate"):
        base.replace(lookahead=2, pregate=True)
    with pytest.raises(ValueError, match="lookahead=2: needs at least one MoE layer"):
        ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=2, lookahead=2)
    with pytest.raises(ValueError, match="lookahead=True: distils.*--init"):
        TrainConfig(lookahead=True)
    with pytest.raises(ValueError, match="lookahead=True: and pregate cannot be combined"):
        TrainConfig(lookahead=True, pregate=True, init="x")
    with pytest.raises(ValueError, match="prefetch='lookahead': the model has no lookahead"):
        plain = make_model("mixtral", context=0, rank=0)
        Engine(plain, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory=budget_for(plain, 4, max_batch_size=2), prefetch="lookahead")))
    with pytest.raises(ValueError, match="batching='expert-aware': the model has no lookahead"):
        Engine(make_model("mixtral", context=0, rank=0), EngineConfig(batching="expert-aware"))


def test_distillation_learns_the_routers_choices_with_the_backbone_frozen():
    model = make_model("qwen3", rank=32).train()
    model.lookahead.init_from_routers([m.router for m in model.moe_layers()])
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, agreements = [], []
    for _ in range(30):
        opt.zero_grad()
        loss, stats = distill_objective(model, ids)
        loss.backward()
        losses.append(loss.item())
        agreements.append(stats["lookahead_agreement"].item())
        opt.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("lookahead.") for n in grads)
    assert losses[-1] < 0.8 * losses[0]
    assert agreements[-1] > agreements[0] + 0.2


def test_distil_then_finetune_and_the_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=320, n_layers=2, d_model=32, n_heads=2,
                      max_seq_len=32, moe_every=1, num_experts=8, expert_d_ff=32, init_std=0.3,
                      router=RouterConfig(top_k=2, dropless=True))
    backbone = Transformer(cfg)
    save_pretrained(backbone, tmp_path / "init")
    run_cfg = TrainConfig(init=str(tmp_path / "init"), lookahead=True, lookahead_rank=16,
                          lookahead_distill_steps=4, data=(str(write_corpus(tmp_path / "c")),),
                          steps=6, batch_size=8, lr=1e-2, warmup_steps=0, val_every=2,
                          val_batches=2, out=str(tmp_path / "run"), progress=False,
                          device="cpu")
    trainer = Trainer(run_cfg)
    result = trainer.run()
    rows = {r["step"]: r for r in map(json.loads,
                                      (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}
    # Phase 1 (steps 1-4): the backbone is frozen, only the router moves (how well it learns:
    # test_distillation_learns_the_routers_choices_with_the_backbone_frozen).
    assert rows[4]["val_loss_own_routers"] == rows[0]["val_loss_own_routers"]
    assert rows[4]["val_lookahead_agreement"] != rows[0]["val_lookahead_agreement"]
    # Phase 2 (steps 5-6): the whole model trains, routed by the lookahead router.
    assert rows[6]["val_loss_own_routers"] != rows[4]["val_loss_own_routers"]
    assert rows[6]["val_loss"] < rows[4]["val_loss"]
    model, _ = load_for_inference(result.checkpoint)
    assert (model.config.lookahead, model.config.lookahead_rank) == (2, 16)
    trained = trainer.model.state_dict()
    init = backbone.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, trained[name]), name
        if ".router.gate." in name:  # the layers' routers no longer route: no gradient
            assert torch.equal(t, init[name]), name
    assert not torch.equal(model.tok_emb.weight, init["tok_emb.weight"])
    # `convert --to moeflow` keeps the router; `--to hf` refuses in one line, writing nothing
    convert(result.checkpoint, tmp_path / "mf", to="moeflow")
    back = from_pretrained(tmp_path / "mf")
    assert torch.equal(back.lookahead.weight, model.lookahead.weight)
    with pytest.raises(ValueError, match="^lookahead: the model routes by a lookahead router"):
        convert(result.checkpoint, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_engine_decodes_as_the_full_forward_and_lookahead_prefetch_changes_nothing(kind):
    model = make_model(kind)
    ps = prompts(3, seed=1)
    _, ref_tokens, ref_logits = run(copy.deepcopy(model), ps, max_batch_size=2)
    for p, toks in zip(ps, ref_tokens):  # the engine passes each row's history right
        seq = list(p)
        for _ in toks:
            seq.append(int(model(torch.tensor([seq]), inference=True).logits[0, -1].argmax()))
        assert seq[len(p):] == toks
    slots = model.config.router.top_k + 1  # far fewer than the experts: forced evictions
    offload = OffloadConfig(device="cpu", gpu_memory=budget_for(model, slots, max_batch_size=2),
                            prefetch="lookahead")
    engine, tokens, logits = run(copy.deepcopy(model), ps, max_batch_size=2, offload=offload)
    assert tokens == ref_tokens
    for rid, rows in ref_logits.items():
        assert all(torch.equal(a, b) for a, b in zip(logits[rid], rows, strict=True))
    stats = engine.stats().offload
    assert stats.cache.copies > slots and stats.cache.prefetch_used > 0
    # The prediction is the routing: every decode step's experts were predicted, nothing else.
    p = stats.prefetch
    assert p.needed > 0 and p.correct == p.needed == p.predicted


def test_padded_graph_decoder_passes_the_history():
    model = make_model("mixtral", context=3)
    ps = prompts(3, seed=4)
    _, ref, _ = run(copy.deepcopy(model), ps, max_batch_size=4)
    engine = Engine(copy.deepcopy(model), EngineConfig(max_batch_size=4))
    engine._decoder = engine._graph_decoder(capture=False)
    assert engine.generate(ps, SamplingParams(max_new_tokens=6, temperature=0)) == ref


def _request(name: str) -> Request:
    return Request(name, [1, 2], SamplingParams(max_new_tokens=4), None)


def _admitted(scheduler: Scheduler, sets: dict[str, set]) -> list[str]:
    return [r.request_id for _, r in scheduler.admit(
        lambda rs: [frozenset(sets[r.request_id]) for r in rs])]


def test_expert_aware_admission_prefers_overlap_ties_to_the_oldest_within_the_window():
    s = Scheduler(3, "expert-aware", window=3, max_wait=100)
    s.add(_request("run"))
    assert _admitted(s, {"run": {1, 2}}) == ["run"]  # one waiting: nothing to choose
    for name in ("a", "b", "c", "d"):
        s.add(_request(name))
    sets = {"run": {1, 2}, "a": {7, 8}, "b": {2, 9}, "c": {9, 1}, "d": {1, 2}}
    # b overlaps the batch by 1; once b is in, c overlaps {1, 2, 9} by 2; d is outside the
    # window of 3 though it would overlap most
    assert _admitted(s, sets) == ["b", "c"]
    assert [r.request_id for r in s.waiting] == ["a", "d"]
    fifo = Scheduler(2)
    for name in "xyz":
        fifo.add(_request(name))
    assert [r.request_id for _, r in fifo.admit()] == ["x", "y"]  # no predictions needed


def test_expert_aware_admission_lets_no_request_starve():
    sets = {"old": {5}, "hot": {1}, "run": {1}, "blocker": {7}}

    def queue() -> Scheduler:
        s = Scheduler(2, "expert-aware", window=4, max_wait=2)
        s.running += [_request("run"), _request("blocker")]
        s.add(_request("old"))
        s.add(_request("hot"))
        return s

    fresh = queue()
    fresh.release(fresh.running[1])
    assert _admitted(fresh, sets) == ["hot"]  # overlaps the batch
    waited = queue()
    for _ in range(3):  # no free slot: rounds pass
        assert _admitted(waited, sets) == []
    waited.release(waited.running[1])
    assert _admitted(waited, sets) == ["old"]  # waited past max_wait: the oldest goes first


def test_expert_aware_engine_gives_each_request_the_tokens_fifo_gives():
    model = make_model("mixtral")
    ps = prompts(5, seed=6)
    _, fifo, _ = run(copy.deepcopy(model), ps, max_batch_size=2)
    engine, aware, _ = run(copy.deepcopy(model), ps, max_batch_size=2, batching="expert-aware",
                           batching_window=4, batching_max_wait=1)
    assert aware == fifo and engine.scheduler.rounds > 2


@pytest.mark.parametrize("policy", ["lru", "cyclic"])
def test_reserved_experts_are_evicted_last(policy):
    cache = _cache(3, policy, layers=2)
    for layer, e in ((0, 0), (1, 0), (1, 1)):
        _use(cache, layer, [e])
    before = set(cache.slot_of)
    cache.reserve(frozenset({(0, 0), (1, 0)}))  # a later layer of this step needs them
    assert _evicted(cache, before, 0, 5) == {(1, 1)}  # the policy alone would take (0, 0)
    cache.reserve(frozenset({(0, 5), (0, 0), (1, 0)}))  # all reserved: one goes anyway
    assert len(_evicted(cache, set(cache.slot_of), 1, 4)) == 1


def test_lookahead_prefetch_stops_before_evicting_an_expert_the_step_needs():
    cache = _cache(4, "cyclic", layers=3)
    for layer, e in ((2, 0), (2, 1), (0, 5)):
        _use(cache, layer, [e])  # one slot stays empty
    lookahead = LookaheadPrefetch(cache, PrefetchLedger())
    lookahead.plan([torch.tensor([[0, 1]])] * 3)  # 6 experts for the step, 4 slots
    # layer 0's two take the empty slot and (0, 5); layer 1's would evict layer 2's: held back
    assert set(cache.slot_of) == {(0, 0), (0, 1), (2, 0), (2, 1)}
    assert cache.stats().prefetches == 2
    slots = cache.acquire(0, [0, 1])
    cache.release(slots)
    lookahead.refill(0)  # layer 0 has run: its slots are spare now
    assert set(cache.slot_of) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for layer in (1, 2):
        _use(cache, layer, [0, 1])
    assert cache.stats().hits == cache.stats().lookups - 3  # the 3 warm-up misses only
