"""Ctrl-C (SIGINT) during `moeflow train` leaves a checkpoint at the next step boundary and exits
130; `--resume` then continues bit-for-bit as if the run had never stopped.

The interrupted run is a real process (the signal is the point); the resume and the uninterrupted
run are the CLI in this process (tests/_train_small.cli_in_process: one thread, as the process
had), so the comparison also crosses from a process to another."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moeflow.train import checkpoint as ckpt_io

from _train_small import REPO, cli_in_process, losses, train_argv, write_config, write_corpus


def test_sigint_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    config = write_config(tmp_path / "micro.json")
    steps = ("--steps", "60")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "moeflow",
                             *train_argv(config, corpus, interrupted, *steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT: stopped at step" in stdout
    stopped = losses(interrupted)[-1][0]
    assert 5 <= stopped < 60
    assert ckpt_io.latest_checkpoint(interrupted).name == ckpt_io.checkpoint_name(stopped)

    r = cli_in_process(*train_argv(config, corpus, interrupted, *steps, "--resume"))
    assert r.returncode == 0, r.stderr
    r = cli_in_process(*train_argv(config, corpus, straight, *steps))
    assert r.returncode == 0, r.stderr
    assert losses(interrupted) == losses(straight)  # exact float equality
