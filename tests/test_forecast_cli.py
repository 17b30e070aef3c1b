"""`moeflow forecast` refusals: nothing already at an --out is replaced or mixed with (train,
predict, eval), a context or horizon the data or the model cannot support, a non-finite CSV
value named by column and line, and a seasonal period longer than the training part. Each is
one `moeflow: error:` line, exit 2, with every file left as it was."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("statsmodels")

from moeflow.cli import main  # noqa: E402

TINY = ("--preset", "tiny", "--steps", 2, "--batch-size", 2, "--log-every", 1)


def _refused(cli, *args, says=()):
    status, out, err = cli(*args)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeflow: error:"), err
    for s in (says if isinstance(says, tuple) else (says,)):
        assert s in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cli(capsys):
    def run(*args):
        status = main([str(a) for a in args])
        out = capsys.readouterr()
        return status, out.out, out.err
    return run


def _sine_csv(path, n=200):
    t = np.arange(n)
    path.write_text("date,v\n" + "".join(f"d{i},{np.sin(i / 5) * 3 + 10:.6f}\n" for i in t))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run on a 200-point sine (176 training points, holdout 24)."""
    root = tmp_path_factory.mktemp("fc")
    csv = _sine_csv(root / "sine.csv")
    run = root / "run"
    assert main(["forecast", "train", "--data", str(csv), "--out", str(run),
                 *map(str, TINY)]) == 0
    return root, csv, run


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_refuses_an_out_that_holds_anything(cli, trained, tmp_path):
    root, csv, run = trained
    lm = tmp_path / "lm"
    (lm / "checkpoints").mkdir(parents=True)
    (lm / "run.json").write_text("{}\n")
    (lm / "metrics.jsonl").write_text('{"step": 1, "tokens": 8, "loss": 3.0}\n')
    other = tmp_path / "nonempty"
    other.mkdir()
    (other / "important.txt").write_text("keep me\n")
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    (lm / "config.json").write_text("{}\n")
    for out, says in [(lm, "already holds a training run (checkpoints, config.json, "
                           "metrics.jsonl and 1 more)"),
                      (run, "already holds a forecast run (forecast.json, metrics.jsonl"),
                      (other, "already holds other files (important.txt)"),
                      (afile, "is an existing file")]:
        before = _snapshot(out) if out.is_dir() else out.read_bytes()
        _refused(cli, "forecast", "train", "--data", csv, "--out", out, *TINY,
                 says=(repr(str(out)), says, "choose another --out"))
        assert (_snapshot(out) if out.is_dir() else out.read_bytes()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = cli("forecast", "train", "--data", csv, "--out", empty, *TINY)
    assert status == 0 and (empty / "forecast.json").is_file(), err


def test_predict_refuses_an_existing_out_and_eval_a_nonempty_one(cli, trained, tmp_path):
    root, csv, run = trained
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    _refused(cli, "forecast", "predict", "--run", run, "--out", metrics,
             says=(repr(str(metrics)), "already exists"))
    assert metrics.read_text() == '{"step": 1}\n'
    _refused(cli, "forecast", "predict", "--run", run, "--out", tmp_path,
             says="is a directory")
    _refused(cli, "forecast", "predict", "--run", run, "--out", tmp_path / "no" / "f.csv",
             says="does not exist")
    fresh = tmp_path / "f.csv"
    status, _, err = cli("forecast", "predict", "--run", run, "--out", fresh, "--horizon", 3)
    assert status == 0 and len(fresh.read_text().splitlines()) == 4, err

    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "run.json").write_text("{}\n")
    _refused(cli, "forecast", "eval", "--run", run, "--out", lm, "--baselines",
             "seasonal_naive", says=(repr(str(lm)), "already holds a training run (run.json)"))
    assert [p.name for p in lm.iterdir()] == ["run.json"]
    # the default RUN/eval: the first evaluation is written, a second one is refused
    assert not (run / "eval").exists()
    status, _, err = cli("forecast", "eval", "--run", run, "--baselines", "seasonal_naive")
    assert status == 0, err
    report = (run / "eval" / "eval.json").read_bytes()
    _refused(cli, "forecast", "eval", "--run", run, "--horizon", 6, "--baselines",
             "seasonal_naive", says=(f"{str(run / 'eval')!r} (the default --out) already "
                                     "holds a forecast evaluation (eval.json, forecasts.png); "
                                     "choose another --out"))
    assert (run / "eval" / "eval.json").read_bytes() == report
    empty = tmp_path / "ev"
    empty.mkdir()
    status, _, err = cli("forecast", "eval", "--run", run, "--out", empty, "--baselines",
                         "seasonal_naive")
    assert status == 0 and json.loads((empty / "eval.json").read_text())["horizon"] == 24


def test_context_and_horizon_beyond_what_they_can_be_are_refused(cli, trained, tmp_path):
    root, csv, run = trained
    for ctx in (100000, 1000, 170):  # 170 + the longest horizon 12 > 176 training points
        t0 = time.perf_counter()
        _refused(cli, "forecast", "train", "--data", csv, "--out", tmp_path / "r", *TINY,
                 "--context-len", ctx, says=(f"context_len={ctx}", "sine:v' has 176 (200 "
                                             "less the holdout of 24)", "at most 164"))
        assert time.perf_counter() - t0 < 5 and not (tmp_path / "r").exists()
    status, _, err = cli("forecast", "train", "--data", csv, "--out", tmp_path / "r", *TINY,
                         "--context-len", 164)
    assert status == 0, err
    t0 = time.perf_counter()
    _refused(cli, "forecast", "predict", "--run", run, "--horizon", 100000,
             says=("--horizon 100000", "context_len (64)"))
    assert time.perf_counter() - t0 < 5
    status, out, err = cli("forecast", "predict", "--run", run, "--horizon", 64)
    assert status == 0 and len(out.strip().splitlines()) == 65, err


@pytest.mark.parametrize("cell", ["nan", "inf", "-Infinity", "1e999"])
@pytest.mark.parametrize("named", [False, True])
def test_a_non_finite_csv_value_is_named_by_column_and_line(cli, tmp_path, cell, named):
    path = tmp_path / "d.csv"
    path.write_text(f"date,v\n2020-01,1\n2020-02,{cell}\n2020-03,3\n")
    _refused(cli, "forecast", "train", "--data", path, "--out", tmp_path / "r",
             *(["--column", "v"] if named else []),
             says=f"column 'v' has a non-finite value at line 3 ({cell!r})")
    assert not (tmp_path / "r").exists()


def test_a_label_column_with_nan_like_text_is_still_a_label(tmp_path):
    from moeflow.forecast.data import load_series

    path = tmp_path / "d.csv"
    path.write_text("who,v\nNan,1\nBob,2\nInf,4\n")
    assert [(s.name, s.values.tolist()) for s in load_series((str(path),))] == [
        ("d:v", [1.0, 2.0, 4.0])]


def test_a_period_longer_than_the_training_part_is_refused(cli, trained, tmp_path):
    root, csv, run = trained
    _refused(cli, "forecast", "eval", "--run", run, "--out", tmp_path / "e", "--period", 10000,
             "--baselines", "seasonal_naive",
             says=("--period 10000", "'sine:v' has 176 points before its held-out tail of 24",
                   "a period below 176"))
    _refused(cli, "forecast", "eval", "--run", run, "--out", tmp_path / "e", "--period", 176,
             "--baselines", "seasonal_naive", says="--period 176")
    assert not (tmp_path / "e").exists()
    _refused(cli, "forecast", "train", "--data", csv, "--out", tmp_path / "r", *TINY,
             "--period", 400, says=("--period 400", "has 176 points"))
    assert not (tmp_path / "r").exists()
    status, _, err = cli("forecast", "eval", "--run", run, "--out", tmp_path / "e",
                         "--period", 175, "--baselines", "seasonal_naive")
    assert status == 0, err
