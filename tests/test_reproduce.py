"""`moeflow reproduce --scale smoke`: every stage, the measurements and the report, through the CLI:
interrupted by SIGINT in a real process and resumed (the resumes run the CLI in this process,
tests/_train_small.cli_in_process); bad input gets one line and exit 2.

The smoke scale checks the machinery, not the claims: the assertions are on what is produced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeflow.reproduce.family import STAGES
from moeflow.train import checkpoint as ckpt_io
from moeflow.train.metrics import read_metrics

from _train_small import REPO, cli_in_process

CLAIMS = ("moe_beats_dense", "moe_reaches_dense_sooner", "moe_matches_larger_dense",
          "pr_moe_keeps_quality", "mos_keeps_quality", "staged_kd_best", "moe_serves_faster")
SMOKE = ("reproduce", "--scale", "smoke", "--device", "cpu")


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / "reproduce.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke reproduction stopped by SIGINT inside dense-M, then resumed to the end."""
    out = tmp_path_factory.mktemp("repro") / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "moeflow", *SMOKE, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        stage = _manifest(out).get("stages", {}).get("dense-M", {})
        if stage.get("status") == "training" and ckpt_io.latest_checkpoint(out / "runs/dense-M"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    interrupted = {"returncode": proc.returncode, "stderr": stderr,
                   "manifest": _manifest(out),
                   "dense_s_metrics": (out / "runs/dense-S/metrics.jsonl").read_bytes()}
    resumed = cli_in_process(*SMOKE, "--out", str(out), "--resume")
    return out, interrupted, resumed


def test_sigint_stops_a_stage_and_resume_finishes_without_retraining(smoke):
    out, interrupted, resumed = smoke
    assert interrupted["returncode"] == 130, interrupted["stderr"]
    assert "interrupted: SIGINT during dense-M" in interrupted["stderr"]
    stages = interrupted["manifest"]["stages"]
    assert stages["dense-S"]["status"] == "done" and stages["dense-M"]["status"] == "training"
    assert resumed.returncode == 0, resumed.stderr
    assert "dense-M: resumed from" in resumed.stdout
    assert "stage dense-S" not in resumed.stdout  # finished stages are not trained again
    assert (out / "runs/dense-S/metrics.jsonl").read_bytes() == interrupted["dense_s_metrics"]
    steps = [r["step"] for r in read_metrics(out / "runs/dense-M/metrics.jsonl")]
    assert steps == list(range(7))  # one uninterrupted-looking run: steps 0..6, each once


def test_every_stage_is_a_finished_run_with_measurements(smoke):
    out, _, _ = smoke
    manifest = _manifest(out)
    assert manifest["scale"] == "smoke"
    for name in STAGES:
        entry = manifest["stages"][name]
        assert entry["status"] == "done" and entry["train_seconds"] > 0, name
        ckpt = ckpt_io.latest_checkpoint(out / "runs" / name)
        assert ckpt is not None and ckpt.name == ckpt_io.checkpoint_name(6), name
        run = json.loads((out / "runs" / name / "run.json").read_text())
        assert run["data"] == [str(out / "data")] and run["steps"] == 6
        measure = entry["measure"]
        assert measure["val"]["loss"] > 0 and measure["prefill_ms"] > 0
        assert set(measure["decode_ms"]) == {"1", "4"}
        assert ("val_capacity_1" in measure) == (name.startswith(("moe", "pr-moe", "mos")))
    students = [json.loads((out / "runs" / n / "run.json").read_text()) for n in
                ("mos-S", "mos-S-kd-always", "mos-S-no-kd")]
    assert [s["teacher"] is not None for s in students] == [True, True, False]
    assert [s["kd_stop_step"] for s in students[:2]] == [3, None]


def test_report_has_every_claim_table_row_and_plot(smoke):
    out, _, _ = smoke
    report = json.loads((out / "report.json").read_text())
    assert [c["key"] for c in report["claims"]] == list(CLAIMS)
    assert all(c["verdict"] in ("holds", "partly", "does not hold") for c in report["claims"])
    assert set(report["models"]) == set(STAGES)
    assert all(len(m["curve"]) == 3 for m in report["models"].values())  # steps 0, 3, 6
    assert report["data"]["train_tokens"] > report["tokens_per_stage"]  # no repetition
    md = (out / "report.md").read_text()
    assert md.count("| **") == len(CLAIMS) and "Smoke scale" in md
    for name in STAGES:
        assert f"| {name} |" in md
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_retrains_one_stage_and_keeps_the_others(smoke):
    out, _, _ = smoke
    before = {n: (out / "runs" / n / "metrics.jsonl").read_bytes() for n in STAGES}
    r = cli_in_process(*SMOKE, "--out", str(out), "--resume", "--only", "moe-S")
    assert r.returncode == 0, r.stderr
    assert "stage moe-S" in r.stdout and "stage dense-S" not in r.stdout
    after = {n: (out / "runs" / n / "metrics.jsonl").read_bytes() for n in STAGES}
    assert all(after[n] == before[n] for n in STAGES if n != "moe-S")
    assert _manifest(out)["stages"]["moe-S"]["status"] == "done"
    assert len(_manifest(out)["commands"]) == 3


@pytest.mark.parametrize("argv, message", [
    (("--only", "dense-XL"), "--only: unknown stage 'dense-XL'"),
    (("--only", "mos-S"), "stage mos-S distils pr-moe-S, which is not trained yet"),
    (("--resume",), "holds no reproduction"),
    (("--scale", "gpu"), "the gpu scale needs a CUDA GPU"),
    (("--scale", "huge"), "invalid choice: 'huge'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, run_cli, argv, message):
    r = run_cli(*SMOKE, "--out", str(tmp_path / "new"), *argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_unwritable_or_occupied_out_is_one_line_exit_2(tmp_path, smoke, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker / "sub", "cannot write there"),
                         (smoke[0], "already holds a reproduction; pass --resume"),
                         (tmp_path, "holds other files")):
        r = run_cli(*SMOKE, "--out", str(out))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


def test_data_that_failed_to_prepare_can_be_replaced_on_resume(tmp_path, monkeypatch):
    """A reproduction whose --data could not be prepared (an empty corpus) has written only its
    manifest: the corrected retry, --resume --data GOOD, takes the new data (it was refused as
    "--data differs"); once data is prepared or a stage trained, --data stays the run's."""
    import moeflow.reproduce.runner as runner

    empty, good = tmp_path / "empty.txt", tmp_path / "good.txt"
    empty.write_text("")
    good.write_text("def f(x):\n    return x\n" * 200)
    out = tmp_path / "out"
    r = cli_in_process(*SMOKE, "--out", str(out), "--data", str(empty))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert _manifest(out)["data"] == [str(empty)]

    seen = []

    def prepare(spec, path, log):  # stands in for the real one: records what it was given
        seen.append(spec.source)
        raise ValueError("stopped here by the test")

    monkeypatch.setattr(runner, "prepare_dataset", prepare)
    r = cli_in_process(*SMOKE, "--out", str(out), "--resume", "--data", str(good))
    assert "stopped here by the test" in r.stderr and seen == [(str(good),)], r.stderr
    assert _manifest(out)["data"] == [str(good)]
    (out / "data").mkdir()
    (out / "data" / "dataset.json").write_text("{}")  # prepared, as far as is_prepared sees
    r = cli_in_process(*SMOKE, "--out", str(out), "--resume", "--data", str(empty))
    assert r.returncode == 2 and "--data differs" in r.stderr, r.stderr
