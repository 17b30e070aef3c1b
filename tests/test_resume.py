"""`moeflow train --resume` as a user meets it: no flag but --out needed (the run's config is read
from OUT/run.json), flags that contradict the run refused by name, `--steps` extending a
finished or unfinished run on the documented lr schedule, bit-exactly across interruptions, and
a summary that compares with where the invocation started. Every command runs in this process
(tests/_train_small.cli_in_process): the CLI's parsing, run.json and checkpoints are the point,
not the interpreter; tests/test_train.py and tests/test_determinism.py resume in fresh ones."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from moeflow.train import checkpoint as ckpt_io

from _train_small import cli_in_process, losses, snapshot, train_argv

LR, FLOOR_RATIO = 3e-3, 0.1  # _train_small.FAST's --lr; TrainConfig's min_lr_ratio


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus, config):
    """A finished 4-step run whose checkpoint state.json lacks the schedule's segments, as every
    checkpoint written before runs could be extended."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    r = cli_in_process(*train_argv(config, corpus, out, "--steps", "4"))
    assert r.returncode == 0, r.stderr
    state_path = ckpt_io.latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    state["scheduler"].pop("segments", None)
    state_path.write_text(json.dumps(state))
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, corpus, config):
    """The same 4-step run stopped after step 2 (validating every 2 steps)."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    r = cli_in_process(*train_argv(config, corpus, out, "--steps", "4", "--stop-at", "2",
                                "--val-every", "2"))
    assert r.returncode == 0, r.stderr
    return out


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("moeflow: error: ") and "Traceback" not in r.stderr
    return lines[0]


def test_resume_needs_no_flag_but_out_and_matches_an_uninterrupted_run(tmp_path, stopped,
                                                                      finished):
    split = tmp_path / "split"
    shutil.copytree(stopped, split)
    resumed = cli_in_process("train", "--out", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # The summary compares with the validation the resume started from, not with itself.
    assert "validation loss " in resumed.stdout and "(step 2) -> " in resumed.stdout
    assert resumed.stdout.rstrip().endswith(
        f"finished at step 4; checkpoint: {split / 'checkpoints' / 'step_00000004'}")
    assert "step 4/4" not in resumed.stdout  # --no-progress came from run.json too
    # Exact: every flag and the schedule were restored. Only --val-every differs, and validation
    # runs in a forked RNG, so step 2's extra validation is the only difference.
    assert [x[:2] for x in losses(split)] == [x[:2] for x in losses(finished)]
    assert [x for x in losses(split) if x[0] != 2] == \
        [x for x in losses(finished) if x[0] != 2]


def test_a_contradicting_flag_is_refused_by_name_and_changes_nothing(finished, run_cli):
    before = snapshot(finished)
    for flag, value, message in [
        ("--lr", "0.01", "lr=0.01 but the run used lr=0.003"),
        ("--batch-size", "8", "batch_size=8 but the run used batch_size=4"),
        ("--steps", "3", "steps=3 but the run used steps=4; --steps can only grow"),
    ]:
        r = run_cli("train", "--out", str(finished), "--resume", flag, value)
        line = one_error_line(r)
        assert f"cannot resume {str(finished)!r}: {message}" in line, line
    assert snapshot(finished) == before


def test_resuming_a_finished_run_says_so_and_names_its_checkpoint(finished, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    r = cli_in_process("train", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    ckpt = out / "checkpoints" / "step_00000004"
    assert f"nothing to do: the run had already finished at step 4 (checkpoint: {ckpt})" \
        in r.stdout
    assert "checkpoint: None" not in r.stdout and " -> " not in r.stdout
    assert losses(out) == losses(finished)


def test_extending_a_finished_run_trains_at_the_floor_and_resumes_bit_exactly(finished,
                                                                              tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    shutil.copytree(finished, straight)
    shutil.copytree(finished, split)
    r = cli_in_process("train", "--out", str(straight), "--resume", "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert "(step 4) -> " in r.stdout and "finished at step 6" in r.stdout
    got = rows(straight)
    assert [row["step"] for row in got] == list(range(7))
    assert got[:5] == rows(finished)  # the first 4 steps are untouched
    # A finished run sits at the floor: its extension stays there (moeflow/train/schedule.py).
    assert [row["lr"] for row in got[5:]] == [LR * FLOOR_RATIO] * 2
    assert json.loads((straight / "run.json").read_text())["steps"] == 6
    assert ckpt_io.load_state(ckpt_io.latest_checkpoint(straight))["scheduler"]["segments"] \
        == [[0, 4], [4, 6]]

    # Interrupted inside the extension, then resumed with no flag: the same losses and rates.
    r = cli_in_process("train", "--out", str(split), "--resume", "--steps", "6", "--stop-at", "5")
    assert r.returncode == 0 and "stopped at step 5" in r.stdout, r.stderr
    r = cli_in_process("train", "--out", str(split), "--resume")
    assert r.returncode == 0 and "finished at step 6" in r.stdout, r.stderr
    assert timeless(rows(split)) == timeless(got)  # exact float equality, every field


def timeless(metrics_rows):
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in metrics_rows]


def test_extending_an_unfinished_run_decays_from_its_current_rate(tmp_path, stopped):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    r = cli_in_process("train", "--out", str(out), "--resume", "--steps", "6")
    assert r.returncode == 0, r.stderr
    lrs = {row["step"]: row["lr"] for row in rows(out) if "lr" in row}
    assert sorted(lrs) == list(range(1, 7))
    floor = LR * FLOOR_RATIO

    def planned(t, total):  # warmup_steps = min(100, 4 // 10) = 0: pure cosine, 0-based t
        return floor + (LR - floor) * 0.5 * (1 + math.cos(math.pi * t / total))

    for step in (1, 2):  # before the extension: the 4-step plan
        assert lrs[step] == pytest.approx(planned(step - 1, 4), rel=1e-12)
    start = planned(2, 4)  # the rate step 3 had under the old plan: no jump
    for step in range(3, 7):  # after: a half cosine from there to the floor at step 6
        t = step - 1
        want = floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * (t - 2) / (6 - 2)))
        assert lrs[step] == pytest.approx(want, rel=1e-12)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[6] > floor


def test_schedule_extension_during_warmup_is_the_plain_longer_schedule():
    from moeflow.train.schedule import LRSchedule

    short = LRSchedule.planned(1.0, 10, 100, 0.1)
    extended = short.extended(5, 400)
    plain = LRSchedule.planned(1.0, 10, 400, 0.1)
    assert [extended.at(t) for t in range(400)] == pytest.approx(
        [plain.at(t) for t in range(400)], rel=1e-12)
    with pytest.raises(ValueError, match="steps=50: a run planned for 100 steps"):
        short.extended(20, 50)
    assert short.extended(20, 100) is short


def test_a_row_cut_short_by_a_kill_is_dropped_and_other_damage_named(tmp_path, stopped,
                                                                     finished):
    """A kill while a row was written leaves its line unterminated: resume drops it (it was
    a JSON error that blocked the run for good); a damaged row elsewhere is named by line."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')
    r = cli_in_process("train", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert [x[:2] for x in losses(out)] == [x[:2] for x in losses(finished)]
    text = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(text[:1] + ["[1]"] + text[1:]) + "\n")
    line = one_error_line(cli_in_process("plot", str(out)))
    assert "metrics.jsonl: line 2 is not a metrics row" in line, line


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path, finished):
    """Killed before it saved anything, a run dir held run.json and metrics but no checkpoint:
    a plain rerun was refused ("already holds a run") and --resume too ("no checkpoint").
    --resume now trains it again from step 0, with the metrics of a run made in one go."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints")
    r = cli_in_process("train", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "no checkpoint: training it again from step 0" in r.stdout + r.stderr
    assert timeless(rows(out)) == timeless(rows(finished))
    assert ckpt_io.latest_checkpoint(out).name == "step_00000004"
