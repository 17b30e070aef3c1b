"""Damaged checkpoint files: every file `train --resume`, `generate` and `serve` read, truncated,
is one line `moeflow: error: ...` naming it, exit status 2, and nothing on disk changes. A
checkpoint holds only JSON and safetensors: nothing in it is unpickled, so nothing in it runs."""

from __future__ import annotations

import contextlib
import io
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moeflow.cli import main
from moeflow.train import checkpoint as ckpt_io

from _train_small import run_moeflow, snapshot, train_argv, write_config, write_corpus

WEIGHTS = "model/shard-00001-model-00001-of-00001.safetensors"
TRAINER = "trainer/shard-00001-model-00001-of-00001.safetensors"
ALL_FILES = (WEIGHTS, TRAINER, "manifest.json", "config.json", "state.json", "tokenizer.json",
             "run.json")
INFERENCE_FILES = (WEIGHTS, "manifest.json", "config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run stopped after one of its two steps: `--resume` would have work to do."""
    root = tmp_path_factory.mktemp("ckfiles")
    out = root / "run"
    argv = train_argv(write_config(root / "micro.json"), write_corpus(root / "data"), out,
                      "--steps", "2", "--stop-at", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out


def damaged_copy(run_dir, tmp_path, filename):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    path = ckpt_io.latest_checkpoint(out) / filename
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return out, path


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def assert_one_line_naming(rc, err, path):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("moeflow: error: ") and str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("filename", [TRAINER, WEIGHTS, "config.json"])
def test_truncated_file_in_a_real_process(run_dir, tmp_path, filename):
    out, path = damaged_copy(run_dir, tmp_path, filename)
    before = snapshot(out)
    r = run_moeflow("train", "--out", str(out), "--resume")
    assert "Traceback" not in r.stderr
    line = assert_one_line_naming(r.returncode, r.stderr, path)
    assert "damaged or truncated" in line
    assert snapshot(out) == before  # nothing deleted, rewritten or added


@pytest.mark.parametrize("filename", ALL_FILES)
def test_every_truncated_file_for_train_resume_generate_and_serve(run_dir, tmp_path, filename):
    out, path = damaged_copy(run_dir, tmp_path, filename)
    before = snapshot(out)
    commands = [("train", "--out", str(out), "--resume")]
    if filename in INFERENCE_FILES:
        commands += [("generate", "--checkpoint", str(out), "--prompt", "def "),
                     ("serve", "--model", str(out), "--port", "0")]
    for argv in commands:
        rc, err = cli(*argv)
        assert_one_line_naming(rc, err, path)
    assert snapshot(out) == before


def test_a_checkpoint_holds_only_json_and_safetensors(run_dir):
    """AdamW's moments of every trainable parameter and the RNG states are safetensors
    tensors; everything else is JSON."""
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    trainer = load_file(ckpt / TRAINER)
    assert trainer["rng.torch"].dtype == torch.uint8
    model, _ = ckpt_io.load_for_inference(ckpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k[len("optim."):].rpartition(".")[0] for k in trainer if k.startswith("optim.")} \
        == trainable
    for name in trainable:
        assert trainer[f"optim.{name}.exp_avg_sq"].min() >= 0
    state = ckpt_io.load_state(ckpt)
    assert state["step"] == 1 and len(state["python_rng"][1]) == 625
