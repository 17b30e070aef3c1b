"""One checkpoint format at any layout (gloo, CPU, several processes).

A tiny PR-MoE (2 and 4 experts) trained by 2 ranks at EP=2 writes its checkpoints through
torch.distributed.checkpoint, each rank its own chunks. Its step-2 checkpoint, AdamW moments
included, resumes in 1 process and on 4 ranks (EP=4 with ZeRO: the 2-expert layer is sliced over
two ranks each and the moments are spread over the replicas) and the next two steps' losses are
the 2-rank run's own; step 4's loss depends on the moments, which a resume without them misses.
The same checkpoint serves through `moeflow serve`'s loader and the engine as it is, with the
logits the 2 ranks computed. A format-1 checkpoint (what moeflow wrote before) still serves
and is refused for --resume in one line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeflow.checkpoint import load_model, load_weights, write_weights
from moeflow.checkpoint.model_dir import MANIFEST
from moeflow.config import ModelConfig
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.model import Transformer
from moeflow.parallel import ParallelConfig, ParallelLayout
from moeflow.parallel.equality import run_steps
from moeflow.parallel.shard import local_part, moe_layer_experts, shard_experts
from moeflow.serve.loader import load_for_serving
from moeflow.train import Trainer, TrainConfig
from moeflow.train import checkpoint as ckpt_io
from tests._train_small import write_word_corpus
from tests.parallel_workers import layouts_worker, spawn, trainer_worker

LOSS_TOL = 2e-6  # fp32 rounding of another layout's sums; fresh moments move step 4 by ~1e-3
# Two prompts of one length: each of the 2 ranks computes one row of the trained model's logits.
PROMPTS_BT = torch.tensor([[5, 17, 33, 2, 9], [7, 1, 4, 120, 3]])


def tiny() -> ModelConfig:
    cfg = ModelConfig.from_name("tiny").replace(vocab_size=384, num_experts=(2, 4))
    return cfg.replace(router=dataclasses.replace(cfg.router, dropless=True))


def resume_from_step2(run: Path, dst: Path) -> Path:
    """A copy of `run` whose latest checkpoint is step 2 (what a run stopped there leaves)."""
    shutil.copytree(run, dst)
    root = dst / ckpt_io.CHECKPOINTS_DIR
    for later in root.glob("step_*"):
        if later.name != ckpt_io.checkpoint_name(2):
            shutil.rmtree(later)
    (root / ckpt_io.LATEST).write_text(ckpt_io.checkpoint_name(2) + "\n")
    return dst


def losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small synthetic text: the tokenizer and the batches cost little on every rank."""
    return write_word_corpus(tmp_path_factory.mktemp("corpus"),
                             "experts hold rows by global id while every rank writes its own "
                             "chunks and reads back any layout", docs=3, words_per_doc=800)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("layouts")
    tiny().save(tmp / "tiny.json")
    kwargs = dict(model_config=str(tmp / "tiny.json"), data=(str(corpus),), seq_len=16, steps=4,
                  save_every=2, batch_size=4, val_every=100, val_batches=1, device="cpu",
                  progress=False, lr=3e-3, out=str(tmp / "run"))
    # trainer_worker: the run layouts_worker makes, then the trained (step-4) model's logits on
    # PROMPTS_BT as the EP=2 ranks compute them, the reference for what the checkpoint serves
    ranks = spawn(trainer_worker, 2, (kwargs, {"ep": 2}, PROMPTS_BT), tmp, timeout_s=120)
    assert [r["step"] for r in ranks] == [4, 4]
    rows = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
    return {"kwargs": kwargs, "run": tmp / "run", "tmp": tmp, "logits": ranks[0]["logits"],
            "continued": {s: v for s, v in losses(rows[1:]).items() if s > 2}}


def test_ep2_checkpoint_resumes_at_1_and_4_ranks_with_the_same_losses(two_rank_run):
    run, kwargs, want = two_rank_run["run"], two_rank_run["kwargs"], two_rank_run["continued"]
    ckpt = ckpt_io.latest_checkpoint(resume_from_step2(run, two_rank_run["tmp"] / "copy"))
    # every rank wrote its own file; the manifest lists the global tensors, experts whole
    assert len(list((ckpt / "model").glob("*.safetensors"))) == 2
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["version"] == 2
    assert manifest["tensors"]["blocks.3.ffn.experts.w_in_EDI"]["shape"] == [4, 128, 512]

    one = resume_from_step2(run, two_rank_run["tmp"] / "one")
    trainer = Trainer(TrainConfig(**{**kwargs, "out": str(one), "resume": True}))
    got = losses(run_steps(trainer, 2)["rows"])
    assert got.keys() == want.keys() == {3, 4}
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), step

    four = resume_from_step2(run, two_rank_run["tmp"] / "four")
    ranks = spawn(layouts_worker, 4, ({**kwargs, "out": str(four), "resume": True},
                                      {"ep": 4, "expert_slicing": True, "zero": True}, 2),
                  two_rank_run["tmp"], timeout_s=120)
    for rows in ranks:
        got = losses(rows)
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), step

    fresh = resume_from_step2(run, two_rank_run["tmp"] / "fresh")
    trainer = Trainer(TrainConfig(**{**kwargs, "out": str(fresh), "resume": True}))
    trainer.prepare()
    trainer.optimizer.state.clear()  # the moments dropped: step 4 must tell
    got = losses(run_steps(trainer, 2)["rows"])
    assert got[3] == pytest.approx(want[3], abs=LOSS_TOL)
    assert abs(got[4] - want[4]) > 50 * LOSS_TOL


def test_ep2_checkpoint_serves_through_the_serve_loader_and_engine(two_rank_run):
    """What the serve loader reads from the training directory is the model the 2 ranks
    trained: its logits are the ranks' own at the last step (each rank its experts, gathered
    by all-to-all), to fp32 rounding of the other layout's sums; the engine's greedy tokens
    are the argmax of plain forwards of that model."""
    run, want_BTV = two_rank_run["run"], two_rank_run["logits"]
    loaded = load_for_serving(run, device="cpu")
    with torch.no_grad():
        got_BTV = loaded.model(PROMPTS_BT).logits.float()
    # fp32 rounding: the same rows through the same ops, summed in another order at most (a
    # few ulps on logits of magnitude ~1); an expert swapped or misplaced moves them by O(0.1)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got_BTV, want_BTV, rtol=16 * eps, atol=16 * eps)
    prompt = PROMPTS_BT[0].tolist()
    out = Engine(loaded.model, EngineConfig(max_batch_size=2)).generate(
        [prompt], SamplingParams(max_new_tokens=4, temperature=0))[0]
    model, _ = ckpt_io.load_for_inference(run)
    ids = list(prompt)
    with torch.no_grad():  # the oracle: greedy over plain full-sequence forwards
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]), inference=True).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_ep2_checkpoint_serves_with_experts_mapped_from_both_ranks_files(two_rank_run):
    """Each rank's file holds its experts' rows (DCP_SHARDING_INFO offsets): expert_store=
    "mmap" maps each expert from the file that holds it and gives the resident tokens."""
    from moeflow.infer.offload import OffloadConfig

    ckpt = ckpt_io.latest_checkpoint(two_rank_run["run"])
    model = load_model(ckpt)
    mapped = load_model(ckpt, map_experts=True)
    prompts = [[5, 17, 33, 2, 9], [7, 1, 4]]
    params = SamplingParams(max_new_tokens=4, temperature=0)
    want = Engine(model, EngineConfig(max_batch_size=2)).generate(prompts, params)
    offload = OffloadConfig(device="cpu", gpu_memory="1GiB", expert_store="mmap")
    engine = Engine(mapped, EngineConfig(max_batch_size=2, offload=offload))
    assert engine.generate(prompts, params) == want
    files = {}
    for i, layer in enumerate(engine.offload.cache.store.layers):
        for e, (w_in, *_) in enumerate(layer):
            files.setdefault(i, set()).add(w_in.untyped_storage().data_ptr())
            assert torch.equal(w_in, model.moe_layers()[i].experts.w_in_EDI[e])
    assert all(len(ptrs) == 2 for ptrs in files.values())  # each layer's experts: two files


def test_swiglu_slices_read_their_block_of_gate_and_up(tmp_path):
    """A SwiGLU model saved by one process loads into every rank of an EP=8 layout with the
    4-expert layer sliced in two: each rank gets exactly its [gate_j | up_j] columns."""
    config = tiny().replace(arch="llama", tie_embeddings=False, num_experts=(4, 8))
    torch.manual_seed(0)
    full = Transformer(config)
    assert full.blocks[1].ffn.experts.activation == "swiglu"
    write_weights(tmp_path, full)
    cfg = ParallelConfig(ep=8, expert_slicing=True)
    for rank in range(8):
        torch.manual_seed(100 + rank)  # other weights: the load must win
        model = Transformer(config)
        layout = ParallelLayout.build(cfg, 8, rank, moe_layer_experts(model))
        for lay in layout.layers:
            layer = model.blocks[lay.layer].ffn
            layer.experts = shard_experts(layer.experts, lay)
        load_weights(model, tmp_path)
        for lay in layout.layers:
            ex, ex_full = model.blocks[lay.layer].ffn.experts, full.blocks[lay.layer].ffn.experts
            assert (lay.slices > 1) == (lay.num_experts < 8)
            for name in ("w_in_EDI", "w_out_EFD"):
                want = local_part(name, getattr(ex_full, name).detach(), lay, True)
                assert torch.equal(getattr(ex, name).detach(), want), (rank, lay.layer, name)
    back = load_model(tmp_path)
    for name, t in full.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_format_1_checkpoint_serves_and_is_refused_for_resume_in_one_line(two_rank_run,
                                                                          tmp_path):
    """What moeflow wrote before the manifest: model.safetensors + optimizer.pt + rng.pt."""
    ckpt = ckpt_io.latest_checkpoint(two_rank_run["run"])
    model, _ = ckpt_io.load_for_inference(ckpt)
    old_run = tmp_path / "old"
    old = old_run / ckpt_io.CHECKPOINTS_DIR / "step_00000004"
    old.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "run.json", "state.json"):
        shutil.copy(ckpt / name, old / name)
    state = model.state_dict()
    state.pop("lm_head.weight")  # tied: format 1 stored the embedding once
    save_file({k: v.contiguous() for k, v in state.items()}, old / "model.safetensors")
    (old / "optimizer.pt").write_bytes(b"")
    (old.parent / ckpt_io.LATEST).write_text(old.name + "\n")
    again, _ = ckpt_io.load_for_inference(old_run)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    trainer = Trainer(TrainConfig(**{**two_rank_run["kwargs"], "out": str(old_run),
                                     "resume": True}))
    with pytest.raises(ValueError, match="format version 1") as e:
        trainer.prepare()
    assert "\n" not in str(e.value)


def test_ep2_checkpoint_lists_both_ranks_files_and_names_a_damaged_one(two_rank_run, tmp_path):
    """Each rank lists the files it wrote (sizes, CRC32s) in the manifest rank 0 writes; a byte
    garbled in rank 1's weights file, which only that file holds, is named on load."""
    import zlib

    from moeflow.checkpoint import CheckpointError

    ckpt = ckpt_io.latest_checkpoint(two_rank_run["run"])
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(p.relative_to(ckpt).as_posix()
                                    for p in ckpt.rglob("*.safetensors"))
    assert {n.split("/")[0] for n in listed} == {"model", "trainer"} and len(listed) == 4
    for name, entry in listed.items():
        data = (ckpt / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["crc32"] == [f"{zlib.crc32(data[i:i + entry['block']]):08x}"
                                  for i in range(0, len(data), entry["block"])]
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    second = copy / "model" / "shard-00002-model-00001-of-00001.safetensors"
    data = bytearray(second.read_bytes())
    data[-3] ^= 0xFF  # the last expert's last weight
    second.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{second}.*CRC32"):
        load_model(copy)
