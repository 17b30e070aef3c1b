"""Training: exact resumption, crash-safe checkpoints, incompatible checkpoints, non-finite
losses, the aux-loss-free bias update, plots and every bad input of `moeflow train`."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from safetensors.torch import load_file

from moeflow.checkpoint import load_weights
from moeflow.cli import main
from moeflow.train import NonFiniteLossError, TrainConfig, Trainer
from moeflow.train import checkpoint as ckpt_io

from _train_small import (cli_in_process, losses, run_moeflow, snapshot, train_argv,
                          write_config)

TRAINER_FILE = "trainer/shard-00001-model-00001-of-00001.safetensors"


# ---- exact resumption, through the CLI ------------------------------------------------------

def test_resume_gives_bit_identical_losses(tmp_path, corpus, config):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # All three runs in this process, one after another: they share its intra-op thread count
    # (which changes CPU reduction order) whatever another test left, and a leg that read the
    # global RNG instead of the run's own would differ here (fresh processes all start from
    # torch's fixed default seed). Fresh processes: tests/test_determinism.py.
    r = cli_in_process(*train_argv(config, corpus, split, "--steps", "8", "--stop-at", "4"))
    assert r.returncode == 0, r.stderr
    assert "stopped at step 4" in r.stdout
    assert [s for s, *_ in losses(split)] == [0, 1, 2, 3, 4]
    r = cli_in_process(*train_argv(config, corpus, split, "--steps", "8", "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "finished at step 8" in r.stdout
    r = cli_in_process(*train_argv(config, corpus, straight, "--steps", "8"))
    assert r.returncode == 0, r.stderr

    expected = losses(straight)
    assert [s for s, *_ in expected] == list(range(9))
    assert all(loss is not None for s, loss, _ in expected[1:])
    assert losses(split) == expected  # exact float equality, train and validation losses
    a, b = (load_file(ckpt_io.latest_checkpoint(run) / TRAINER_FILE) for run in (straight, split))
    assert a.keys() == b.keys() and any(k.endswith(".exp_avg") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- a process killed while writing a checkpoint -------------------------------------------

_KILL_WHILE_WRITING = """
import os, signal, sys
import moeflow.train.checkpoint as ck
write = ck._write_bytes
def dying_write(path, data):
    if ".tmp-step_00000004" in str(path) and path.name == "state.json":
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
ck._write_bytes = dying_write
from safetensors.torch import load_file

from moeflow.checkpoint import load_weights
from moeflow.cli import main
sys.exit(main(sys.argv[1:]))
"""

_KILL_BEFORE_POINTER = """
import os, signal, sys
replace = os.replace
def dying_replace(src, dst):
    if str(dst).endswith("latest") and "step_00000004" in open(src).read():
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
os.replace = dying_replace
from safetensors.torch import load_file

from moeflow.checkpoint import load_weights
from moeflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("script", [_KILL_WHILE_WRITING, _KILL_BEFORE_POINTER],
                         ids=["mid-file", "before-latest"])
def test_killed_during_checkpoint_keeps_previous(tmp_path, corpus, config, script, capsys):
    out = tmp_path / "run"
    argv = train_argv(config, corpus, out, "--steps", "6", "--save-every", "2")
    r = run_moeflow(*argv, script=script)
    assert r.returncode == -9, (r.returncode, r.stderr)

    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    ckpt = ckpt_io.latest_checkpoint(out)
    assert ckpt == root / "step_00000002"
    model, tokenizer = ckpt_io.load_for_inference(out)  # loadable, weights and tokenizer
    assert ckpt_io.load_state(ckpt)["step"] == 2 and tokenizer.vocab_size <= 320

    if script is _KILL_BEFORE_POINTER:  # step 4 was renamed into place but is not `latest`
        assert (root / "step_00000004" / "manifest.json").is_file()
    else:
        assert list(root.glob(".tmp-step_00000004-*"))  # the half-written one, ignored

    assert main([*argv, "--resume"]) == 0  # and the run continues from step 2
    assert "resumed from" in capsys.readouterr().out
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert not list(root.glob(".tmp-*"))  # stale temporary directories were swept
    assert [s for s, *_ in losses(out)] == list(range(7))


# ---- incompatible checkpoints --------------------------------------------------------------

def _train_in_process(out, config, corpus, **kw):
    cfg = TrainConfig(model_config=str(config), data=(str(corpus),), out=str(out),
                      batch_size=4, val_every=4, val_batches=2, lr=3e-3, progress=False,
                      **kw)
    trainer = Trainer(cfg)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, corpus, config):
    """One finished 8-step run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "small"
    _train_in_process(out, config, corpus, steps=8, save_every=4)
    return out


def test_incompatible_checkpoint_names_first_tensor_and_changes_nothing(small_run, tmp_path):
    from moeflow.model import Transformer

    saved = ckpt_io.load_model_config(ckpt_io.latest_checkpoint(small_run))
    other = saved.replace(num_experts=(4, 6))  # the second MoE layer has 6 experts, not 8
    model = Transformer(other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_weights(model, ckpt_io.latest_checkpoint(small_run))
    msg = str(e.value)
    assert "'blocks.3.ffn.router.gate.weight'" in msg and "[8, 32]" in msg and "[6, 32]" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # Through the CLI: resuming after the config file changed is refused, the run untouched.
    changed = tmp_path / "micro.json"
    data = json.loads((small_run / "run.json").read_text())
    write_config(changed, d_model=48)
    before_files = snapshot(small_run)
    argv = ["train", "--config", str(changed), "--data", *data["data"], "--out",
            str(small_run), "--steps", "8", "--batch-size", "4", "--val-every", "4",
            "--val-batches", "2", "--lr", "3e-3", "--resume"]
    rc, err = _cli(argv)
    assert rc == 2
    assert "'tok_emb.weight'" in err and "[320, 32]" in err and "[320, 48]" in err
    assert snapshot(small_run) == before_files


# ---- non-finite loss -----------------------------------------------------------------------

class _PoisonedTrainer(Trainer):
    """Multiplies the objective by NaN at one step; records the weights before each step."""

    poison_step = 3

    def forward_loss(self, input_BT, target_BT, step, groups_BT=None):
        objective, stats = super().forward_loss(input_BT, target_BT, step, groups_BT)
        if step == self.poison_step:
            objective = objective * float("nan")
        return objective, stats

    def train_step(self, step):
        self.before_step = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.opt_steps = [s["step"].clone() for s in self.optimizer.state.values()]
        return super().train_step(step)


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, corpus, config):
    out = tmp_path / "nan"
    cfg = TrainConfig(model_config=str(config), data=(str(corpus),), out=str(out), steps=6,
                      batch_size=4, val_every=4, val_batches=2, save_every=2, progress=False)
    trainer = _PoisonedTrainer(cfg)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; stopped before the "
                                                   r"optimizer step; last good checkpoint: "):
        trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(trainer.before_step[k], v) for k, v in after.items())
    assert [s["step"] for s in trainer.optimizer.state.values()] == trainer.opt_steps
    assert ckpt_io.latest_checkpoint(out).name == "step_00000002"
    assert [s for s, *_ in losses(out)] == [0, 1, 2]  # the poisoned step wrote no row


def test_no_save_at_end_writes_metrics_and_no_checkpoint(tmp_path, corpus, config):
    """--no-save-at-end (a throwaway run: fp8_loss.py's comparisons) trains and records as
    usual; only the closing checkpoint is not written. save_every still saves."""
    out = tmp_path / "nosave"
    cfg = TrainConfig(model_config=str(config), data=(str(corpus),), out=str(out), steps=4,
                      batch_size=4, val_every=2, val_batches=1, save_every=3, save_at_end=False,
                      progress=False)
    result = Trainer(cfg).run()
    assert result.finished and [s for s, *_ in losses(out)] == [0, 1, 2, 3, 4]
    assert result.checkpoint.name == "step_00000003"
    assert ckpt_io.latest_checkpoint(out).name == "step_00000003"
    none = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "none"), save_every=0)).run()
    assert none.checkpoint is None and not (tmp_path / "none" / "checkpoints").exists()
    assert "checkpoint: none (--no-save-at-end)" in none.summary()[-1]


# ---- aux-loss-free balancing ----------------------------------------------------------------

def test_expert_bias_is_updated_from_the_steps_counts(tmp_path, corpus):
    cfg_path = write_config(tmp_path / "bias.json", router={
        "top_k": 1, "dropless": True, "score_func": "sigmoid", "expert_bias": True,
        "bias_update_rate": 0.01, "aux_loss_coef": 0.0})
    cfg = TrainConfig(model_config=str(cfg_path), data=(str(corpus),), out=str(tmp_path / "b"),
                      steps=3, batch_size=4, val_every=4, val_batches=2, progress=False)
    trainer = Trainer(cfg)
    trainer.prepare()
    seen = []
    update = trainer.model.update_expert_biases

    def recording(counts):
        seen.append([c.clone() for c in counts])
        update(counts)

    trainer.model.update_expert_biases = recording
    trainer.run()
    assert len(seen) == 3  # once per optimizer step, with every MoE layer's counts
    tokens = 4 * 32
    for i, layer in enumerate(trainer.model.moe_layers()):
        assert all(int(step[i].sum()) == tokens for step in seen)  # top-1, dropless
        expected = sum(0.01 * torch.sign(s[i].float().mean() - s[i].float()) for s in seen)
        assert torch.allclose(layer.router.expert_bias, expected)
        assert layer.router.expert_bias.abs().sum() > 0


# ---- plots ---------------------------------------------------------------------------------

def test_plot_writes_pngs(small_run, capsys):
    assert main(["plot", str(small_run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(small_run / "loss.png"), str(small_run / "expert_load.png")]
    for name in printed:
        head = open(name, "rb").read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(name) > 5000


def test_plot_of_a_forecast_run_says_what_it_is(tmp_path, capsys):
    """A forecast run has a metrics.jsonl too, without token counts (it was a KeyError)."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 1.2, "huber": 0.7, "expert_load": [[5, 3]]}\n')
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a language-model training run" in err[0], err
    assert not list(tmp_path.glob("*.png"))


def test_expert_load_colour_is_relative_to_uniform_so_layers_of_any_size_compare():
    """A balanced 4-expert layer and a balanced 8-expert layer get the same value (1), so the
    heatmap's colour shows imbalance, not the expert count; step 0 is left out."""
    from moeflow.train.plots import relative_expert_load

    rows = [{"step": 0, "moe_layers": [1, 3], "expert_load": [[40, 0, 0, 0], [5] * 8]},
            {"step": 4, "moe_layers": [1, 3], "expert_load": [[10] * 4, [5] * 8]},
            {"step": 8, "moe_layers": [1, 3], "expert_load": [[20, 10, 10, 0], [12] + [4] * 7]}]
    layers, steps, relative = relative_expert_load(rows)
    assert layers == [1, 3] and steps == [4, 8]
    # Shares times E, averaged over steps 4 and 8.
    assert relative[0].tolist() == pytest.approx([1.5, 1.0, 1.0, 0.5, *[float("nan")] * 4],
                                                 nan_ok=True)
    assert relative[1].tolist() == pytest.approx([(1 + 2.4) / 2] + [(1 + 0.8) / 2] * 7)
    balanced = relative_expert_load(rows[:2])[2]
    assert balanced[0, :4].tolist() == balanced[1].tolist()[:4] == [1.0] * 4


# ---- bad input: one line, exit status 2, nothing written or overwritten --------------------

def _cli(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, err.getvalue()


def _bad_inputs(tmp, corpus, config, small_run):
    empty_dir = tmp / "empty_dir"
    empty_dir.mkdir()
    blank = tmp / "blank.txt"
    blank.write_text("  \n\n")
    binary = tmp / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    small = tmp / "small.txt"
    small.write_text("x = 1\n")
    bad_json = tmp / "bad.json"
    bad_json.write_text("{not json")
    bad_field = write_config(tmp / "bad_field.json", d_model=30, n_heads=4)
    bad_jsonl = tmp / "records.jsonl"
    bad_jsonl.write_text('{"text": "a"}\n{"body": "b"}\n')
    other = tmp / "other_out"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    base = ["train", "--config", str(config), "--steps", "2", "--no-progress"]
    return [
        ("missing data", base + ["--data", str(tmp / "absent")], "does not exist"),
        ("empty dir", base + ["--data", str(empty_dir)], "holds no text files"),
        ("blank file", base + ["--data", str(blank)], "holds no text"),
        ("not utf-8", base + ["--data", str(binary)], "is not UTF-8 text"),
        ("bad jsonl", base + ["--data", str(bad_jsonl)], "no string field 'text'"),
        ("too small", base + ["--data", str(small)], "corpus too small"),
        ("malformed config", ["train", "--config", str(bad_json), "--data", str(corpus),
                              "--steps", "2"], "not valid JSON"),
        ("invalid config", ["train", "--config", str(bad_field), "--data", str(corpus),
                            "--steps", "2"], "d_model=30"),
        ("missing config", ["train", "--config", str(tmp / "nope.yaml"), "--steps", "2"],
         "does not exist"),
        ("bad flag value", base + ["--steps", "0"], "steps=0"),
        ("bad flag type", base + ["--lr", "fast"], "invalid float value"),
        ("other files in out", base + ["--data", str(corpus), "--out", str(other)],
         "already holds other files"),
        ("another run in out", base + ["--data", str(corpus), "--out", str(small_run)],
         "already holds a run"),
        ("resume nothing", base + ["--data", str(corpus), "--out", str(tmp / "new"),
                                   "--resume"], "holds no checkpoint"),
        ("resume another schedule", base + ["--data", str(corpus), "--out", str(small_run),
                                            "--resume"],
         "steps=2 but the run used steps=8"),
    ]


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, corpus, config, small_run):
    cases = _bad_inputs(tmp_path, corpus, config, small_run)
    before = snapshot(tmp_path)
    run_before = snapshot(small_run)
    for name, argv, message in cases:
        out_given = "--out" in argv
        if not out_given:
            argv = argv + ["--out", str(tmp_path / "out")]
        rc, err = _cli(argv)
        assert rc == 2, (name, rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moeflow: error: "), (name, err)
        assert message in lines[0], (name, lines[0])
        assert not (tmp_path / "out").exists(), name
    assert snapshot(tmp_path) == before
    assert snapshot(small_run) == run_before


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, config):
    r = run_moeflow("train", "--config", str(config), "--data", str(tmp_path / "absent"),
                    "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"moeflow: error: data path {str(tmp_path / 'absent')!r} does not exist"]
    assert not (tmp_path / "out").exists()


def test_plot_and_generate_refuse_non_runs(tmp_path):
    rc, err = _cli(["plot", str(tmp_path)])
    assert rc == 2 and "holds no metrics.jsonl" in err
    rc, err = _cli(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"])
    assert rc == 2 and "does not exist" in err
    rc, err = _cli(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    assert rc == 2 and "holds no moeflow checkpoint" in err


def test_adamw_is_torchs_fused_kernel_on_cuda_and_its_default_on_the_cpu():
    """On CUDA the trainer steps AdamW with torch's fused kernel (one pass per tensor list;
    foreach, torch's CUDA default, ran 2.7x longer on an H200: benchmarks/results/
    optimizer_step); on the CPU torch's default, which the exact-resumption tests pin down.
    The CUDA choice is checked with CPU parameters (torch's fused AdamW runs on both)."""
    trainer = Trainer(TrainConfig(preset="tiny"))
    model = torch.nn.Linear(4, 4)
    for device, fused in (("cpu", None), ("cuda", True)):
        trainer.device = torch.device(device)
        opt = trainer.build_optimizer(model)
        assert opt.defaults["fused"] is fused, device
        assert opt.defaults["foreach"] is None


def test_every_rank_validates_an_equal_share_of_a_short_split(tmp_path, corpus, config):
    """A validation split with fewer windows than asked for was cut into uneven shares: an
    IndexError on the last rank, a collective mismatch between ranks' expert all-to-alls, or a
    loss skewed by averaging unequal means. The windows are trimmed to a multiple of the world
    size (prepare() on rank 0 of a world of w; no process group needed) and a split with fewer
    windows than ranks is one line."""
    def prepared(world, batch):
        cfg = TrainConfig(model_config=str(config), data=(str(corpus),), seq_len=16, steps=2,
                          batch_size=batch, val_batches=50, device="cpu", progress=False,
                          out=str(tmp_path / f"w{world}"))
        trainer = Trainer(cfg, rank=0, world=world)
        trainer.prepare()
        return trainer

    alone = len(prepared(1, 6).val_windows)
    assert alone < 50 * 6  # the split is short: every window it has is taken
    for world in (2, 3, 4):
        got = len(prepared(world, 12).val_windows)
        assert got == alone // world * world, (world, got, alone)
    with pytest.raises(ValueError, match=f"holds {alone} windows of 16 tokens, fewer than the "
                                         f"{alone + 1} ranks"):
        prepared(alone + 1, alone + 1)
