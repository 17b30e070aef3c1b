"""Mixture-of-Students: the KD loss, staged KD inside one run, students started from teachers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moeflow.model import Transformer
from moeflow.train import TrainConfig, Trainer
from moeflow.train import checkpoint as ckpt_io
from moeflow.train.distill import align_layers, kd_loss

from _train_small import MICRO, write_config, write_corpus


def _cfg(out, config, corpus, **kw):
    base = dict(model_config=str(config), data=(str(corpus),), out=str(out), batch_size=4,
                val_every=3, val_batches=2, lr=3e-3, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mos")
    corpus = write_corpus(root / "data")
    teacher_cfg = write_config(root / "teacher.json")
    # The student drops the teacher's last two layers (a dense one and the 8-expert MoE one).
    student_cfg = write_config(root / "student.json", n_layers=2, num_experts=[4])
    Trainer(_cfg(root / "teacher", teacher_cfg, corpus, steps=6)).run()
    return root, corpus, teacher_cfg, student_cfg


def test_kd_loss_is_the_tempered_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kd_loss(t, t.clone(), 2.0).item() == 0.0
    T = 2.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, T), expected)
    assert kd_loss(s, t, T) > 0


def test_student_identical_to_teacher_has_zero_kd(setup, tmp_path):
    """The teacher routes as served (dropless): a copy of it that routes dropless in eval mode
    (eval_capacity_factor None) has zero KD; with the teacher's own eval capacity it drops."""
    root, corpus, _, _ = setup
    dropless_eval = {**MICRO["router"], "eval_capacity_factor": None}
    same = write_config(tmp_path / "same.json", router=dropless_eval)
    trainer = Trainer(_cfg(tmp_path / "same", same, corpus, steps=2,
                           teacher=str(root / "teacher")))
    trainer.prepare()
    assert trainer.layer_mapping == [0, 1, 2, 3]
    batch = trainer.loader.next_batch()
    assert trainer.teacher(batch[:, :-1]).dropped_fraction > 0
    torch.manual_seed(0)
    trainer.model.eval()
    _, stats = trainer.forward_loss(batch[:, :-1], batch[:, 1:], step=1)
    assert stats["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_student_starts_from_teacher_layers(setup, tmp_path):
    root, corpus, _, student_cfg = setup
    trainer = Trainer(_cfg(tmp_path / "init", student_cfg, corpus, steps=2,
                           teacher=str(root / "teacher")))
    trainer.prepare()
    assert trainer.layer_mapping == [0, 1]
    assert align_layers(trainer.model, trainer.teacher) == [0, 1]
    s, t = trainer.model.state_dict(), trainer.teacher.state_dict()
    for name, tensor in s.items():
        assert torch.equal(tensor, t[name]), name  # same names: layers 0, 1 + embeddings, head
    # Random init for comparison differs.
    torch.manual_seed(0)
    fresh = Transformer(trainer.model_config)
    assert not torch.equal(fresh.state_dict()["blocks.1.ffn.router.gate.weight"],
                           t["blocks.1.ffn.router.gate.weight"])


def test_staged_kd_switches_off_and_the_student_trains(setup, tmp_path):
    root, corpus, _, student_cfg = setup
    out = tmp_path / "student"
    result = Trainer(_cfg(out, student_cfg, corpus, steps=6, teacher=str(root / "teacher"),
                          kd_alpha=0.5, kd_temperature=2.0, kd_stop_step=4,
                          student_init="random")).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows if "kd_loss" in r] == [1, 2, 3]
    assert all(r["kd_loss"] > 0 for r in train_rows if "kd_loss" in r)
    (_, first), (_, last) = result.val_losses[0], result.val_losses[-1]
    assert last < first - 0.05
    # The student shares the teacher's tokenizer and is saved with it.
    ckpt = ckpt_io.latest_checkpoint(out)
    assert ckpt_io.load_tokenizer(ckpt).to_str() == \
        ckpt_io.load_tokenizer(ckpt_io.latest_checkpoint(root / "teacher")).to_str()
    assert ckpt_io.load_model_config(ckpt).n_layers == 2


def test_kd_objective_is_ce_plus_alpha_t2_kl(setup, tmp_path):
    """The objective, recomputed here from both models' logits (not from the trainer's
    statistics): CE + router loss + α·T²·KL(softmax(t/T) ‖ softmax(s/T)), the KL the mean over
    tokens, with the teacher routed as served; from kd_stop_step on, CE + router loss."""
    root, corpus, _, student_cfg = setup
    alpha, T = 0.3, 2.0
    trainer = Trainer(_cfg(tmp_path / "obj", student_cfg, corpus, steps=4,
                           teacher=str(root / "teacher"), kd_alpha=alpha, kd_temperature=T,
                           kd_stop_step=2, student_init="random"))
    trainer.prepare()
    batch = trainer.loader.next_batch()
    input_BT, target_BT = batch[:, :-1], batch[:, 1:]
    trainer.model.eval()  # no router noise: two forwards give the same logits
    objective, stats = trainer.forward_loss(input_BT, target_BT, step=1)
    with torch.no_grad():
        out = trainer.model(input_BT)
        teacher_NV = trainer.teacher(input_BT, inference=True).logits.float().flatten(0, 1)
    student_NV = out.logits.float().flatten(0, 1)
    ce = F.cross_entropy(student_NV, target_BT.flatten())
    kl = F.kl_div(F.log_softmax(student_NV / T, -1), F.log_softmax(teacher_NV / T, -1),
                  log_target=True, reduction="sum") / student_NV.shape[0]
    # a random student (not the teacher's layers, whose KL is ~1e-4 here): the KD term, α·T²·KL
    # ~1e-2, is far above the objective's fp32 rounding (~64 ulps of ~6: 5e-5)
    assert kl > 1e-3
    expected = ce + out.router_loss + alpha * T ** 2 * kl
    eps = torch.finfo(torch.float32).eps  # fp32 sums over V and N, in another order
    torch.testing.assert_close(objective.detach(), expected, rtol=64 * eps, atol=0)
    objective, stats = trainer.forward_loss(input_BT, target_BT, step=2)
    assert "kd_loss" not in stats
    torch.testing.assert_close(objective.detach(), ce + out.router_loss, rtol=64 * eps, atol=0)


def test_teacher_with_another_width_is_refused_before_writing(setup, tmp_path):
    root, corpus, _, _ = setup
    teacher_width = ckpt_io.load_model_config(ckpt_io.latest_checkpoint(root / "teacher")).d_model
    wide = write_config(tmp_path / "wide.json", d_model=2 * teacher_width, n_layers=2,
                        num_experts=[4])
    with pytest.raises(ValueError, match=f"equal widths: student d_model {2 * teacher_width}, "
                                         f"teacher {teacher_width}"):
        Trainer(_cfg(tmp_path / "wide", wide, corpus, steps=2,
                     teacher=str(root / "teacher"))).prepare()
    assert not (tmp_path / "wide").exists()
