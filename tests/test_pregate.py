"""Pre-gate heads (moeflow.model.pregate, `moeflow train --pregate`): untrained heads predict
what zero-shot pre-gating predicts; a short fine-tune of the tiny preset beats zero-shot on
held-out windows, changes nothing but the heads, saves and loads with the checkpoint, and the
offloaded engine prefetching with the trained heads decodes exactly as the resident engine."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from moeflow import ModelConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.placement import plan_offload
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.interop.pretrained import save_pretrained
from moeflow.model.pregate import pregate_loss, topk_recall
from moeflow.train.checkpoint import load_for_inference
from moeflow.train.pregate import backbone_routing, freeze_backbone, pregate_objective
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer
from tests._train_small import write_corpus


@pytest.mark.parametrize("rank,depth", [(0, 1), (16, 1), (16, 2)])
def test_untrained_heads_predict_what_zero_shot_predicts(rank, depth):
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny").replace(pregate=True, n_layers=6, num_experts=8,
                                                   router={"top_k": 2}, pregate_rank=rank,
                                                   pregate_depth=depth)
    model = Transformer(config)
    moe = model.moe_layers()
    model.pregate.init_from_routers([m.router for m in moe])
    x_TD = torch.randn(64, config.d_model)
    for i in range(len(moe) - 1):
        zero_TK = moe[i + 1].router(x_TD, inference=True).ids_TK
        head_TK = model.pregate.predict(i, x_TD)
        assert torch.equal(zero_TK.sort(-1).values, head_TK.sort(-1).values)
    if rank:  # the MLP's output starts at zero, but it is there and can learn
        assert model.pregate.heads[0].down.weight.shape == (rank, config.d_model)
        assert model.pregate.heads[0].down.weight.abs().sum() > 0
        assert len(model.pregate.heads[0].mid) == depth - 1


def test_pregate_rank_and_depth_are_checked():
    with pytest.raises(ValueError, match="pregate_rank"):
        ModelConfig.from_name("tiny").replace(pregate_rank=8)
    with pytest.raises(ValueError, match="pregate_depth"):
        ModelConfig.from_name("tiny").replace(pregate=True, pregate_depth=2)
    with pytest.raises(ValueError, match="pregate_depth"):
        ModelConfig.from_name("tiny").replace(pregate=True, pregate_rank=8, pregate_depth=0)


def test_heads_saved_before_depth_existed_load_as_depth_one():
    """A config without pregate_depth is a depth-1 head with the parameter names of before."""
    config = ModelConfig.from_name("tiny").replace(pregate=True, pregate_rank=8)
    old = config.to_dict()
    del old["pregate_depth"]
    loaded = ModelConfig.from_dict(old)
    assert loaded.pregate_depth == 1
    names = set(Transformer(loaded).pregate.state_dict())
    assert names == {f"heads.0.{n}" for n in ("weight", "down.weight", "down.bias",
                                              "up.weight", "up.bias")}
    deeper = Transformer(loaded.replace(pregate_depth=2))
    assert set(deeper.pregate.state_dict()) == names | {"heads.0.mid.0.weight",
                                                        "heads.0.mid.0.bias"}
    with pytest.raises(RuntimeError, match="mid"):  # a depth-2 model refuses depth-1 weights
        deeper.pregate.load_state_dict(Transformer(loaded).pregate.state_dict())


def test_pregate_loss_and_recall():
    ids_TK = torch.tensor([[0, 2], [1, 3]])
    good = torch.full((2, 4), -10.0).scatter(1, ids_TK, 10.0)
    assert pregate_loss(good, ids_TK) < 0.7 < pregate_loss(torch.zeros(2, 4), ids_TK)
    assert pregate_loss(torch.zeros(2, 4), ids_TK) == pytest.approx(torch.log(torch.tensor(4.0)))
    assert topk_recall(torch.tensor([[0, 1], [3, 2]]), ids_TK) == (2, 4)


def test_kl_objective_is_the_kl_to_the_next_router_and_training_lowers_it():
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny").replace(pregate=True, n_layers=6, num_experts=8,
                                                   router={"top_k": 2}, pregate_rank=16,
                                                   pregate_depth=2, max_seq_len=32)
    model = Transformer(config)
    freeze_backbone(model)
    input_BT = torch.randint(0, config.vocab_size, (4, 32))
    seen = backbone_routing(model, input_BT)
    moe = model.moe_layers()
    want = []
    for i in range(len(model.pregate)):
        p_TE = F.linear(seen[i + 1][0], moe[i + 1].router.gate.weight).softmax(-1)
        q_TE = model.pregate.logits(i, seen[i][0]).softmax(-1)
        want.append((p_TE * (p_TE.log() - q_TE.log())).sum(-1).mean())
    loss, _ = pregate_objective(model, input_BT, "kl")
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam(model.pregate.parameters(), lr=1e-2)
    for _ in range(20):
        step_loss, _ = pregate_objective(model, input_BT, "kl")
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    assert pregate_objective(model, input_BT, "kl")[0] < 0.7 * loss
    assert all(p.grad is None for n, p in model.named_parameters()
               if not n.startswith("pregate."))


def test_pregate_finetune_beats_zero_shot_and_round_trips_through_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone = Transformer(ModelConfig.from_name("tiny").replace(max_seq_len=32))
    save_pretrained(backbone, tmp_path / "init")
    cfg = TrainConfig(init=str(tmp_path / "init"), pregate=True,
                      data=(str(write_corpus(tmp_path / "corpus")),), steps=10, batch_size=16,
                      lr=3e-2, warmup_steps=0, val_every=10, val_batches=2,
                      out=str(tmp_path / "run"), progress=False, device="cpu")
    trainer = Trainer(cfg)
    result = trainer.run()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 10
    # Heads start as the next router's gate: exactly zero-shot's predictions.
    assert first["val_pregate_recall"] == first["val_zero_shot_recall"]
    # The backbone is frozen: zero-shot's recall and the LM loss do not move.
    assert last["val_zero_shot_recall"] == first["val_zero_shot_recall"]
    assert last["val_loss"] == first["val_loss"]
    assert last["val_pregate_recall"] > first["val_zero_shot_recall"] + 0.05

    model, _ = load_for_inference(result.checkpoint)
    assert model.config.pregate
    trained = trainer.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, trained[name]), name
        if not name.startswith("pregate."):
            assert torch.equal(t, backbone.state_dict()[name]), name
    head = model.pregate.heads[0].weight
    assert not torch.equal(head, model.moe_layers()[1].router.gate.weight)

    # The offloaded engine, prefetching with the trained heads, decodes as the resident one.
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9)]
    params = SamplingParams(max_new_tokens=6, temperature=0)

    def decode(m, **engine):
        e = Engine(m, EngineConfig(max_batch_size=2, max_seq_len=32, **engine))
        seen: dict[str, list[torch.Tensor]] = {}
        e.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
        return e, e.generate(prompts, params), seen

    _, ref_tokens, ref_logits = decode(copy.deepcopy(model))
    kv = SlotKVCache.bytes_per_token(model) * 2 * 32
    plan = plan_offload(model, OffloadConfig(device="cpu", gpu_memory="64GiB"), kv, 32, 2)
    budget = str(plan.fixed + 3 * plan.expert)  # 3 slots for tiny's 4 + 8 experts
    engine, tokens, logits = decode(model, offload=OffloadConfig(device="cpu", gpu_memory=budget,
                                                                 prefetch="pregate"))
    assert engine.offload.plan.slots == 3
    assert tokens == ref_tokens
    for rid, rows_ in ref_logits.items():
        assert all(torch.equal(a, b) for a, b in zip(logits[rid], rows_, strict=True))
    assert engine.stats().offload.prefetch.predicted > 0
