"""Shared by the training tests: a model far smaller than `tiny`, a small corpus, CLI helpers.

The corpus is a copy of the standard library's `json` package (~50 KB of Python, present in
every CPython), so tokenizer training and packing take milliseconds. The model is a 4-layer
PR-MoE-shaped GPT (MoE layers 1 and 3 with 4 and 8 experts, top-1 with capacity, jitter noise
so that the RNG state matters for resumption).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MICRO = {
    "name": "micro", "arch": "gpt", "vocab_size": 320, "n_layers": 4, "d_model": 32,
    "n_heads": 2, "max_seq_len": 32, "moe_kind": "residual_moe", "moe_every": 2,
    "num_experts": [4, 8],
    "router": {"top_k": 1, "min_capacity": 2, "noise": "jitter"},
}

# Flags that make every run small and fast.
FAST = ("--batch-size", "4", "--val-every", "4", "--val-batches", "2", "--lr", "3e-3",
        "--no-progress")

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, **changes) -> Path:
    cfg = {**MICRO, **changes}
    path.write_text(json.dumps(cfg))
    return path


def write_corpus(directory: Path) -> Path:
    src = Path(json.__file__).parent
    directory.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.py")):
        shutil.copy(f, directory / f.name)
    return directory


def write_word_corpus(directory: Path, sentence: str, docs: int, words_per_doc: int) -> Path:
    """`docs` text files of words drawn at random (seed 0) from `sentence`: a corpus whose
    tokenizer and batches cost little, for the multi-process tests where every rank builds both."""
    import torch

    g = torch.Generator().manual_seed(0)
    words = sentence.split()
    for i in range(docs):
        ids = torch.randint(0, len(words), (words_per_doc,), generator=g).tolist()
        (directory / f"doc{i}.txt").write_text(" ".join(words[j] for j in ids))
    return directory


def train_argv(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--data", str(data), "--out", str(out),
            *FAST, *extra]


def run_moeflow(*argv: str, script: str | None = None, timeout: float = 120,
                threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m moeflow ARGV` in a fresh process (or `python -c SCRIPT ARGV`); `threads`: its
    torch intra-op threads (default: the tests' one, tests/conftest.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MOEFLOW_DEBUG", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", script, *argv] if script else \
        [sys.executable, "-m", "moeflow", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def cli_in_process(*argv: str) -> subprocess.CompletedProcess:
    """`moeflow ARGV` run in this process (what tests/conftest.py's `run_cli` does, usable from a
    module fixture): the CLI a user meets, without an interpreter and torch import per call.
    It runs on the tests' one intra-op thread (tests/conftest.py), whatever another test left, so
    its numbers are a fresh `run_moeflow` process's (the thread count changes CPU reduction
    order). A leg that read the global RNG instead of its run's own would differ between two
    such runs (fresh processes all start from torch's fixed default seed, which hides that)."""
    import contextlib
    import io

    import torch

    from moeflow.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.pop("MOEFLOW_DEBUG", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            os.environ["MOEFLOW_DEBUG"] = saved
    return subprocess.CompletedProcess(["moeflow", *argv], code, out.getvalue(), err.getvalue())


def losses(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """(step, loss, val_loss) of every metrics row, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def train_variants(tmp_path: Path, config: Path, corpus: Path, steps: int,
                   **variants: tuple[str, ...]) -> dict[str, list]:
    """`losses` of one short run per variant (its extra flags), each in tmp_path / name."""
    runs = {}
    for name, extra in variants.items():
        r = cli_in_process(*train_argv(config, corpus, tmp_path / name, "--steps", str(steps),
                                       *extra))
        assert r.returncode == 0, r.stderr
        runs[name] = losses(tmp_path / name)
    return runs


def assert_follows(run: list, reference: list, rel: float) -> None:
    """The same steps, and every training and validation loss within `rel` of the reference's."""
    for (s, loss, val), (s_r, loss_r, val_r) in zip(run, reference, strict=True):
        assert s == s_r
        for a, b in ((loss, loss_r), (val, val_r)):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < rel * abs(b))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to prove nothing was changed."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}
