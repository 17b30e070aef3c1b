"""Expert × data parallelism on 2 gloo ranks (CPU) against the 1-process run of the same batches.

Every comparison runs the trainer users run: `ParallelTrainer` on the ranks (the code behind
`torchrun ... moeflow train --ep 2`) and `Trainer` in one process. Two spawned runs serve all
multi-rank tests (module fixtures): one drives several layouts through the trainer's train_step
(moeflow.parallel.equality.run_steps) and saves a sharded checkpoint, the other runs whole
trainings. Every spawn has a deadline, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests._triton_cpu import TRITON  # noqa: I001  (sets Triton's interpreter on CPU, ranks too)
from moeflow.config import ModelConfig
from moeflow.model import Transformer
from moeflow.checkpoint import load_weights, write_weights
from moeflow.parallel import ParallelConfig, ParallelLayout
from moeflow.parallel.equality import run_steps, slice_of_full
from moeflow.parallel.shard import local_part, moe_layer_experts, shard_experts
from moeflow.train import Trainer, TrainConfig
from tests._train_small import write_word_corpus
from tests.parallel_workers import (exchange_worker, free_port, next_step, scenarios_worker,
                                     spawn, trainer_worker, tweak)

STEPS = 4


def tiny(**router) -> ModelConfig:
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=384)
    return cfg.replace(router=dataclasses.replace(cfg.router, **router))


def build(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


SCENARIOS = {
    # name: (model config, ParallelConfig kwargs, model tweaks (tests.parallel_workers.tweak))
    "ep2_dropless": (tiny(dropless=True), {"ep": 2}, ()),
    "ep1_replicas": (tiny(dropless=True), {"ep": 1}, ()),
    "ep2_hierarchical": (tiny(dropless=True), {"ep": 2, "hierarchical": True,
                                                "ranks_per_node": 1}, ()),
    "ep2_capacity": (tiny(dropless=False, capacity_factor=8.0), {"ep": 2, "exchange": "capacity"},
                     ()),
    # layer 1 has a single expert: sliced over both ranks (tensor-parallel expert)
    "ep2_sliced_zero": (tiny(dropless=True).replace(num_experts=(1, 2)),
                        {"ep": 2, "expert_slicing": True, "zero": True}, ()),
    # a layer with fewer experts than ep, not sliced: 1 EP rank and 2 replicas for it
    "ep2_replicated_layer": (tiny(dropless=True).replace(num_experts=(1, 2)), {"ep": 2}, ()),
    "ep2_one_expert": (tiny(dropless=True), {"ep": 2}, ("one_expert",)),
    # the reference expert path skips empty experts: rank 1's output has no autograd path to
    # the rows it received, and its backward must still run the exchange (it hung under NCCL)
    "ep2_one_expert_reference": (tiny(dropless=True), {"ep": 2},
                                 ("one_expert", "reference_experts")),
}
if TRITON:
    SCENARIOS["ep2_triton_dispatch"] = (tiny(dropless=True), {"ep": 2}, ("triton_dispatch",))
    SCENARIOS["ep2_capacity_triton_dispatch"] = (
        tiny(dropless=False, capacity_factor=8.0), {"ep": 2, "exchange": "capacity"},
        ("triton_dispatch",))
    # the fused routing kernel sums its balance counts over the ranks before its aux loss
    SCENARIOS["ep2_triton_router"] = (tiny(dropless=True), {"ep": 2}, ("triton_router",))


# Capacity dropping is decided per rank, so these runs are compared with each other, not with
# one process: the fixed-capacity and the uneven exchange must compute the same thing.
DROP_SCENARIOS = {
    "ep2_drops_capacity": (tiny(dropless=False, capacity_factor=1.0),
                           {"ep": 2, "exchange": "capacity"}, ()),
    "ep2_drops_uneven": (tiny(dropless=False, capacity_factor=1.0),
                         {"ep": 2, "exchange": "uneven"}, ()),
}
if TRITON:  # dropped assignments parked behind the kept rows of the Triton gather
    DROP_SCENARIOS["ep2_drops_uneven_triton_dispatch"] = (
        tiny(dropless=False, capacity_factor=1.0), {"ep": 2, "exchange": "uneven"},
        ("triton_dispatch",))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"),
                             "experts route tokens while dense layers replicate and ranks "
                             "exchange rows over the group so every gradient is averaged",
                             docs=4, words_per_doc=1500)


def train_kwargs(tmp_path, corpus, config: ModelConfig, name: str = "tiny") -> dict:
    """TrainConfig fields of a small CPU run of `config` (written to a file, as --config)."""
    config_path = tmp_path / f"{name}.json"
    config.save(config_path)
    return dict(model_config=str(config_path), data=(str(corpus),), seq_len=16, steps=5,
                batch_size=4, val_every=5, val_batches=1, device="cpu", progress=False,
                out=str(tmp_path / f"{name}-run"))


def trainer_config(tmp_path, corpus) -> dict:
    kwargs = train_kwargs(tmp_path, corpus, tiny(dropless=True))
    del kwargs["out"]
    return kwargs


@pytest.fixture(scope="module")
def scenario_runs(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("scenarios")
    ckpt = tmp / "ckpt_ep2"
    runs = {**SCENARIOS, **DROP_SCENARIOS}
    kwargs = {name: train_kwargs(tmp, corpus, c, name) for name, (c, _, _) in runs.items()}
    eval_tokens = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    args = ({k: (kwargs[k], p, f) for k, (_, p, f) in runs.items()}, STEPS, str(ckpt),
            eval_tokens)
    ranks = spawn(scenarios_worker, 2, args, tmp, timeout_s=150)
    return {"ranks": ranks, "ckpt": ckpt, "eval_tokens": eval_tokens, "kwargs": kwargs}


def single_process(train: dict, tweaks: tuple[str, ...]) -> dict:
    trainer = Trainer(TrainConfig(**train))
    trainer.prepare()
    tweak(trainer.model, tweaks)
    return run_steps(trainer, STEPS)


def assert_rows_match(rows, ref, keys=("loss", "aux_loss", "val_loss", "grad_norm")):
    by_step = {r["step"]: r for r in ref}
    for b in rows:
        a = by_step[b["step"]]
        assert ("loss" in b) == ("loss" in a)
        for key in keys:
            if key in b:
                # fp32 losses to 1e-5; the gradient norm, summed in another order per layout
                # and amplified by AdamW where second moments are small, to 5e-5 relative
                tol = {"rel": 5e-5} if key == "grad_norm" else {"abs": 1e-5}
                assert b[key] == pytest.approx(a[key], **tol), (a["step"], key)
        if "expert_load" in b and "val_loss" in keys:
            assert a["expert_load"] == b["expert_load"]


def losses(rows) -> list[float]:
    return [r["loss"] for r in rows]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(scenario_runs, name):
    config, _, tweaks = SCENARIOS[name]
    ref = single_process(scenario_runs["kwargs"][name], tweaks)
    r0, r1 = (r[name] for r in scenario_runs["ranks"])
    assert [r["step"] for r in r0["rows"]] == list(range(1, STEPS + 1))
    assert r0["rows"] == [{**r, "tokens_per_s": a["tokens_per_s"]}  # every rank reports
                          for r, a in zip(r1["rows"], r0["rows"])]  # the global batch's row
    assert_rows_match(r0["rows"], ref["rows"])
    # expert gradients of the first step, keyed by global expert id (and slice), against the
    # full model's
    grads = {**r0["expert_grads"], **r1["expert_grads"]}
    swiglu = config.arch == "llama"
    assert {k.partition(".slice")[0] for k in grads} == set(ref["expert_grads"])
    for key, g in grads.items():
        torch.testing.assert_close(g, slice_of_full(ref["expert_grads"], key, swiglu),
                                   atol=1e-6, rtol=1e-4, msg=key)


def test_aux_loss_reduction_is_one_all_reduce_per_moe_layer(scenario_runs):
    """Under data parallelism the router sums its balance counts over the ranks where it
    computes the aux loss: one all-reduce per MoE layer and micro-batch, issued by the routing
    path itself, and nothing recomputed (the whole step's collectives are counted)."""
    for r in scenario_runs["ranks"]:
        per_step = r["collectives"]
        assert per_step["all_reduce @ router.py:route_reference"] == 2  # tiny: 2 MoE layers
        assert per_step["all_reduce @ trainer.py:reduce_stats"] == 1  # the metrics row
        assert per_step == {"all_reduce @ router.py:route_reference": 2,
                            "all_reduce @ trainer.py:reduce_stats": 1,
                            "all_reduce @ overlap.py:_launch": 1,
                            "all_reduce @ grads.py:grad_norm": 1,
                            "all_to_all_single @ all_to_all.py:exchange_counts": 2,
                            "all_to_all_single @ all_to_all.py:forward": 4,
                            "all_to_all_single @ all_to_all.py:backward": 4}


@pytest.mark.parametrize("other", list(DROP_SCENARIOS)[1:])
def test_capacity_exchange_with_drops_matches_uneven_exchange(scenario_runs, other):
    for r in scenario_runs["ranks"]:
        cap, uneven = r["ep2_drops_capacity"], r[other]
        assert losses(cap["rows"]) == pytest.approx(losses(uneven["rows"]), abs=1e-5)
        for key, g in cap["expert_grads"].items():
            torch.testing.assert_close(g, uneven["expert_grads"][key], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["ep2_one_expert", "ep2_one_expert_reference"])
def test_forced_single_expert_leaves_ranks_idle(scenario_runs, name):
    """All tokens on expert 0 in the first step: rank 1 holds experts that receive nothing,
    and still finished."""
    r1 = scenario_runs["ranks"][1][name]
    idle = [g for k, g in r1["expert_grads"].items()]
    assert idle and all(torch.count_nonzero(g) == 0 for g in idle)


def test_reshard_ep2_to_ep1(scenario_runs):
    """The EP=2 trainer's weights (written by both ranks) load into a 1-process trainer (whose
    weights were scrambled first, so the load must win): same logits, same next two steps."""
    saved = scenario_runs["ranks"][0]["saved"]
    trainer = Trainer(TrainConfig(**scenario_runs["kwargs"]["ep2_dropless"]))
    trainer.prepare()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    load_weights(trainer.model, scenario_runs["ckpt"])
    loaded = next_step(trainer, scenario_runs["eval_tokens"], sharded=False)
    torch.testing.assert_close(loaded["logits"], saved["logits"], atol=1e-5, rtol=1e-5)
    assert losses(loaded["rows"]) == pytest.approx(losses(saved["rows"]), abs=1e-5)


@pytest.mark.parametrize("ep,slicing", [(4, False), (8, True)])
def test_reshard_ep2_to_wider_layouts(scenario_runs, ep, slicing):
    """Every rank of an EP=4 (or EP=8 with the 4-expert layer sliced in two) layout loads exactly
    its global experts' weights. The layout is arithmetic, so the ranks are built in-process."""
    config = SCENARIOS["ep2_dropless"][0]
    full = build(config, seed=123)
    load_weights(full, scenario_runs["ckpt"])
    ref = Trainer(TrainConfig(**scenario_runs["kwargs"]["ep2_dropless"]))
    ref.prepare()  # the weights the EP=2 trainer started from, and saved
    for name, t in ref.model.state_dict().items():
        torch.testing.assert_close(full.state_dict()[name], t, atol=0, rtol=0, msg=name)
    cfg = ParallelConfig(ep=ep, expert_slicing=slicing)
    for rank in range(ep):
        model = build(config, seed=99)
        layout = ParallelLayout.build(cfg, ep, rank, moe_layer_experts(model))
        for lay in layout.layers:
            layer = model.blocks[lay.layer].ffn
            layer.experts = shard_experts(layer.experts, lay)
        load_weights(model, scenario_runs["ckpt"])
        for lay in layout.layers:
            ex, ex_full = model.blocks[lay.layer].ffn.experts, full.blocks[lay.layer].ffn.experts
            assert ex.layout == lay and ex.expert_ids == lay.expert_ids
            assert (lay.slices > 1) == (slicing and lay.num_experts < ep)
            for name in ("w_in_EDI", "w_out_EFD", "b_in_EI", "b_out_ED"):
                if getattr(ex, name) is None:
                    continue
                want = local_part(name, getattr(ex_full, name).detach(), lay, False)
                assert torch.equal(getattr(ex, name).detach(), want), (rank, lay.layer, name)


def test_checkpoint_mismatch_names_tensor_and_both_shapes(tmp_path):
    config = tiny(dropless=True)
    write_weights(tmp_path, build(config, 0))
    wrong_count = build(config.replace(num_experts=(4, 16)), 0)
    with pytest.raises(ValueError, match=r"'blocks.3.ffn.router.gate.weight' has shape \[8, 128\] "
                                         r"in the checkpoint but \[16, 128\] in the model"):
        load_weights(wrong_count, tmp_path)
    wrong_width = build(config.replace(expert_d_ff=256), 0)
    with pytest.raises(ValueError, match=r"'blocks.1.ffn.experts.w_in_EDI' has shape \[4, 128, "
                                         r"512\] in the checkpoint but \[4, 128, 256\]"):
        load_weights(wrong_width, tmp_path)


def test_layouts_per_layer_pr_moe():
    """PR-MoE on 64 ranks: a 32-expert and a 64-expert layer are both valid."""
    layers = {0: 32, 1: 64}
    plain = ParallelLayout.build(ParallelConfig(ep=64), 64, 37, layers)
    a, b = plain.layers
    assert (a.ep_size, a.slices, a.num_replicas, a.expert_ids) == (32, 1, 2, (5,))
    assert a.expert_dp_ranks() == (5, 37)
    assert (b.ep_size, b.slices, b.num_replicas, b.expert_ids) == (64, 1, 1, (37,))
    sliced = ParallelLayout.build(ParallelConfig(ep=64, expert_slicing=True), 64, 37, layers)
    a = sliced.layers[0]
    assert (a.ep_size, a.slices, a.expert_ids, a.slice_index) == (64, 2, (18,), 1)
    assert a.owners(18) == (36, 37)
    with pytest.raises(ValueError, match="layer 0: 48 experts"):
        ParallelLayout.build(ParallelConfig(ep=32), 64, 0, {0: 48})
    with pytest.raises(ValueError, match="ep"):
        ParallelConfig(ep=0)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("one")
    Trainer(TrainConfig(**trainer_config(tmp, corpus), out=str(tmp / "run"))).run()
    return metrics(tmp / "run")


def test_trainer_ep2_matches_one_process(tmp_path, corpus, one_process_run):
    """`moeflow train` on 2 ranks with --ep 2 writes the 1-process run's metrics.jsonl, and its
    checkpoint (saved at EP=2) loads in one process with the same logits."""
    from moeflow.train.checkpoint import load_for_inference

    common = trainer_config(tmp_path, corpus)
    eval_tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    ranks = spawn(trainer_worker, 2, ({**common, "out": str(tmp_path / "two")}, {"ep": 2},
                                      eval_tokens), tmp_path, timeout_s=100)
    rows = metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == list(range(6))
    assert_rows_match(rows, one_process_run)
    model, _ = load_for_inference(ranks[0]["checkpoint"])
    with torch.no_grad():
        logits = model(eval_tokens).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], atol=1e-5, rtol=1e-5)


def test_trainer_resume_at_same_and_other_layout(tmp_path, corpus):
    """Stopped at step 3 on 2 ranks (EP=2, ZeRO, 2 accumulated micro-batches of 1 sequence per
    rank): resuming on 2 ranks restores the sharded AdamW state and continues exactly like the
    1-process run with the same global micro-batches (micro_batch=2); resuming in 1 process from
    the same checkpoint loads the weights (so step 4's loss, computed before its update, is
    still the same; its micro-batches of 1 sequence change the aux loss's balance counts, so
    later steps differ: tests/test_checkpoint_layouts.py compares moments across layouts)."""
    import shutil

    common = {**trainer_config(tmp_path, corpus), "out": str(tmp_path / "two"), "micro_batch": 1}
    Trainer(TrainConfig(**{**common, "micro_batch": 2, "out": str(tmp_path / "ref")})).run()
    ref = metrics(tmp_path / "ref")
    spawn(trainer_worker, 2, ({**common, "stop_at": 3}, {"ep": 2, "zero": True}, None),
          tmp_path, timeout_s=100)
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    spawn(trainer_worker, 2, ({**common, "resume": True}, {"ep": 2, "zero": True}, None),
          tmp_path, timeout_s=100)
    rows = metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == list(range(6))
    assert_rows_match(rows, ref)

    result = Trainer(TrainConfig(**{**common, "out": str(tmp_path / "one"),
                                    "resume": True})).run()
    assert result.finished
    step4 = next(r for r in metrics(tmp_path / "one") if r["step"] == 4)
    assert_rows_match([{"step": 4, "loss": step4["loss"]}], ref)


def test_hierarchical_all_to_all_matches_flat(tmp_path):
    """4 ranks as 2 nodes × 2: same rows in the same order as the flat exchange, both ways."""
    ranks = spawn(exchange_worker, 4, (2,), tmp_path, timeout_s=60)
    counts = ranks[0]["counts"]
    for dst, r in enumerate(ranks):
        assert torch.equal(r["hier"], r["flat"])
        assert torch.equal(r["grad_hier"], r["grad_flat"])
        # what dst received from src is src's chunk for dst, in source order
        expect = []
        for src in range(4):
            start = int(counts[src, :dst].sum())
            expect.append(ranks[src]["sent"][start:start + int(counts[src, dst])])
        assert torch.equal(r["flat"], torch.cat(expect))


def test_torchrun_cli_ep2(tmp_path, corpus):
    """The documented launch: `torchrun --nproc-per-node 2 -m moeflow train ... --ep 2` (gloo)."""
    import subprocess
    import sys

    config_path = tmp_path / "tiny.json"
    tiny(dropless=True).replace(vocab_size=384).save(config_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "moeflow", "train", "--config",
           str(config_path), "--data", str(corpus), "--seq-len", "16", "--steps", "2",
           "--batch-size", "4", "--val-every", "2", "--val-batches", "1", "--device", "cpu",
           "--no-progress", "--out", str(tmp_path / "run"), "--ep", "2", "--zero"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 2") == 1  # printed by rank 0 only
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]

    # Extended by one step with --resume and no training flag: every rank reads run.json.
    resume = cmd[:cmd.index("train") + 1] + ["--out", str(tmp_path / "run"), "--resume",
                                             "--steps", "3", "--ep", "2", "--zero"]
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 3") == 1
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["lr"] == pytest.approx(1e-3 * 0.1, rel=1e-12)  # the floor, as documented
