"""Damaged and hostile checkpoint files: every file `train --resume`, `generate` and `serve` read,
truncated, is one line `moeflow: error: ...` naming it, exit status 2, and nothing on disk
changes; a pickle that would run code is refused without running it."""

from __future__ import annotations

import contextlib
import io
import os
import shutil

import pytest
import torch

from moeflow.cli import main
from moeflow.train import checkpoint as ckpt_io

from _train_small import run_moeflow, snapshot, train_argv, write_config, write_corpus

ALL_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json",
             "tokenizer.json", "run.json")
INFERENCE_FILES = ("model.safetensors", "config.json", "tokenizer.json")


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


@pytest.mark.parametrize("filename", ["optimizer.pt", "rng.pt", "model.safetensors",
                                      "config.json"])
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


def test_a_pickle_that_would_run_code_is_refused_without_running_it(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = ckpt_io.latest_checkpoint(out) / "optimizer.pt"
    torch.save({"state": {0: Payload()}, "param_groups": []}, path)
    rc, err = cli("train", "--out", str(out), "--resume")
    line = assert_one_line_naming(rc, err, path)
    assert "refused without running them" in line and "posix.mkdir" in line
    assert not marker.exists()


def test_optimizer_and_rng_state_load_with_weights_only(run_dir):
    """What this code writes needs no allow-listed global: AdamW's state and the RNG states
    (torch's generator state and Python's random.getstate() tuple) are plain data."""
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    for name in ("optimizer.pt", "rng.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt / name) == []
    rng = ckpt_io.load_torch(ckpt, "rng.pt")
    assert isinstance(rng["python"], tuple) and rng["torch"].dtype == torch.uint8
    optimizer = ckpt_io.load_torch(ckpt, "optimizer.pt")
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.95)
    assert all(torch.is_tensor(s["exp_avg"]) for s in optimizer["state"].values())
