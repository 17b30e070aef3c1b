"""Fixtures shared by the training tests (see tests/_train_small.py); a test file may define its
own fixture of the same name (tests/test_parallel.py's corpus does).

One torch thread per test process, set before any test runs and inherited by the processes the
tests start (`python -m moeflow ...`, ranks): pytest-xdist runs one worker per core, and the
tests' tensors are tiny, where a second intra-op thread only adds synchronisation — with the
cores busy, a 2-thread training step of the micro model took 11x as long as a 1-thread one.

Without CUDA, Triton kernels run through its interpreter (TRITON_INTERPRET=1, tests/_triton_cpu.py),
set here before any test module is imported: test_compiled_blocks imports torch._dynamo, which
imports Triton, before the parity modules set the flag, and once torch.compile had run in that
worker the parity tests failed ("Cannot call @triton.jit'd outside of the scope of a kernel")."""

import os
import subprocess

import pytest
import torch
from _train_small import write_config, write_corpus

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A copy of the standard library's json package: a small real-code corpus."""
    return write_corpus(tmp_path_factory.mktemp("data") / "json_src")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The micro PR-MoE's model config file."""
    return write_config(tmp_path_factory.mktemp("cfg") / "micro.json")


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`moeflow ARGV` run in this process, as a CompletedProcess (returncode, stdout, stderr):
    for tests of what a command prints and returns, without an interpreter and torch import per
    call (~3 s each on 2 cores). Tests of a real process's behaviour (no traceback, signals,
    exit codes from the shell) start one instead."""
    from moeflow.cli import main

    monkeypatch.delenv("MOEFLOW_DEBUG", raising=False)

    def run(*argv: str) -> subprocess.CompletedProcess:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else 2
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["moeflow", *argv], code, out.out, out.err)
    return run


def pytest_sessionfinish(session):
    """Stop the fork server that tests/parallel_workers.spawn starts its ranks from (if any), and
    wait for it: its CPU time and its ranks' then count as this process's children's, and no
    process outlives the session."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # noqa: SLF001 - the stdlib's one way to stop and reap it
