import json
import os
import re
import subprocess
import sys

import pytest


def moeflow(*args):
    return subprocess.run([sys.executable, "-m", "moeflow", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_json_for_a_paper_preset(run_cli):
    r = run_cli("info", "--preset", "1.3b-pr-moe-64-128", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert abs(info["total_params"] - 31e9) / 31e9 < 0.03
    assert info["active_params"] < info["total_params"] / 10
    assert info["experts_per_moe_layer"] == [64] * 10 + [128] * 2


def test_info_table_lists_every_preset(run_cli):
    from moeflow import PRESETS

    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    for name in PRESETS:
        assert name in r.stdout


def test_unknown_preset_is_one_line_exit_2():
    r = moeflow("info", "--preset", "nope")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "unknown preset 'nope'" in lines[0] and "350m-pr-moe-32-64" in lines[0]


@pytest.mark.parametrize("content, message", [
    ("{broken", "not valid JSON"),
    ('{"n_layers": 2, "moe_every": 1, "num_experts": [4], "d_model": 64, "n_heads": 4}',
     "num_experts="),
    ('{"d_model": 30, "n_heads": 4}', "d_model=30"),
    ('{"router": 5}', "router=5: must be a mapping"),  # was an AttributeError traceback
    ('{"router": null}', "router=None: must be a mapping"),
    ('{"arch": "llama", "mla": [1]}', "mla=[1]: must be a mapping"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, run_cli, content, message):
    path = tmp_path / "model.json"
    path.write_text(content)
    r = run_cli("info", "--config", str(path))
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_config_file(tmp_path, run_cli):
    r = run_cli("info", "--config", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("info", "--config", str(tmp_path))  # it exists: "does not exist" misled
    assert r.returncode == 2 and "is a directory, not a config file" in r.stderr, r.stderr


def test_demo_refuses_zero_steps(tmp_path, run_cli):
    """--steps 0 ran the whole 600-step demo (0 read as "not given"); -1 was refused."""
    for steps in ("0", "-1"):
        r = run_cli("demo", "--steps", steps, "--out", str(tmp_path / "d"))
        assert r.returncode == 2 and f"steps={steps}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_trains_and_samples(tmp_path, run_cli):
    """The README's main command, shortened: stdlib corpus, tokenizer, training, sample (the CLI
    in this process: what it prints and returns is the point, not the interpreter)."""
    r = run_cli("demo", "--steps", "5", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]  # 0: the loss fell
    before, after = re.search(r"validation loss: (\d+\.\d+) before training → (\d+\.\d+) after",
                              r.stdout).groups()
    assert float(after) < float(before)
    sample = r.stdout.split("sample (temperature 0.8, top-k 40):\n")[1].split("\ndone in")[0]
    assert sample.startswith("def ") and sample[len("def "):].strip()
    assert any((tmp_path / "demo" / "checkpoints").iterdir())


def test_version(capsys):
    from moeflow import __version__
    from moeflow.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"moeflow {__version__}"


@pytest.mark.parametrize("error, status, line", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 51200000000 bytes."), 1,
     "moeflow: error: out of memory: can't allocate memory: you tried to allocate 51200000000 "
     "bytes."),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 9 GiB"
                                                   "\nmore lines"), 1,
     "moeflow: error: out of memory: CUDA out of memory. Tried to allocate 9 GiB"),
])
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, error, status, line):
    """A model too large for the machine (say --vocab-size 100000000) ends in one line naming
    the allocation, not an allocator traceback; other RuntimeErrors still raise."""
    import moeflow.cli as cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert cli.main(["info", "--preset", "tiny"]) == status
    assert capsys.readouterr().err.strip().splitlines() == [line]
    monkeypatch.setattr(cli, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        cli.main(["info", "--preset", "tiny"])


def test_a_missing_extra_names_the_pip_install(monkeypatch, capsys):
    """`moeflow serve` after the Quickstart's plain install ended in a ModuleNotFoundError
    traceback; a module outside the extras still raises."""
    import moeflow.cli as cli

    def missing(name):
        def command(args):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return command

    monkeypatch.setattr(cli, "cmd_serve", missing("uvicorn"))
    assert cli.main(["serve", "--model", "m"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "moeflow: error: `moeflow serve` needs uvicorn, which comes with the 'serve' extra: "
        "pip install 'moeflow[serve]'"]
    monkeypatch.setattr(cli, "cmd_serve", missing("numpy"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["serve", "--model", "m"])


@pytest.mark.parametrize("content, where", [
    ("name: x\nn_layers: 2\nrouter:\n  top_k: [1\nd_model: 64\n", "line 5, column 8"),
    ("name: x\n\td_model: 64\n", "line 2, column 1"),
])
def test_yaml_error_names_the_line(tmp_path, capsys, content, where):
    from moeflow.cli import main

    path = tmp_path / "model.yaml"
    path.write_text(content)
    assert main(["info", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moeflow: error: {path}: not valid YAML: ")
    assert where in lines[0], lines[0]


def test_demo_refuses_an_existing_run_without_suggesting_a_flag_it_lacks(tmp_path, run_cli):
    from _train_small import snapshot

    out = tmp_path / "demo"
    out.mkdir()
    (out / "run.json").write_text("{}")
    before = snapshot(out)
    r = run_cli("demo", "--steps", "1", "--out", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"--out {str(out)!r} already holds a training run" in lines[0]
    assert "pass --resume" not in lines[0] and "demo trains from scratch" in lines[0]
    assert snapshot(out) == before


def test_serve_and_bench_serve_flags_come_from_their_configs(monkeypatch):
    import dataclasses

    from moeflow.cli import build_parser, given
    from moeflow.serve.bench import BenchConfig
    from moeflow.serve.config import ServeConfig

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "ckpt"])
    assert ServeConfig(**given(args, ServeConfig)) == ServeConfig(model="ckpt")
    argv = ["serve", "--model", "m", "--served-model-name", "n", "--host", "0.0.0.0",
            "--port", "9", "--max-batch", "2", "--max-queue", "3", "--max-seq-len", "64",
            "--cache-tokens", "128", "--max-body-bytes", "100", "--drain-timeout", "1.5",
            "--device", "cpu", "--dtype", "bfloat16", "--default-max-tokens", "5",
            "--threads", "1", "--log-level", "info", "--group-rule", "modality",
            "--default-group", "code", "--batching", "expert-aware"]
    got = ServeConfig(**given(parser.parse_args(argv), ServeConfig))
    assert got == ServeConfig("m", "n", "0.0.0.0", 9, 2, 3, 64, 128, 100, 1.5, "cpu",
                              "bfloat16", 5, 1, "info", "modality", "code", "expert-aware")
    assert {f.name for f in dataclasses.fields(ServeConfig)} - {"offload", "parallel"} == set(
        given(parser.parse_args(argv), ServeConfig))  # every field has a flag; those: their own
    from moeflow.cli import serve_config
    from moeflow.infer.offload import OffloadConfig
    from moeflow.parallel.inference import InferenceParallel

    assert serve_config(parser.parse_args(argv)).offload is None
    assert serve_config(parser.parse_args(argv)).parallel == InferenceParallel()
    got = serve_config(parser.parse_args(argv + ["--tp", "2", "--ep", "4", "--a2a", "plain",
                                                 "--timeout-s", "9"]))
    assert got.parallel == InferenceParallel(tp=2, ep=4, a2a="plain", timeout_s=9.0)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert serve_config(parser.parse_args(argv)).offload is None
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # only --gpu-memory sets it
    got = serve_config(parser.parse_args(argv + ["--gpu-memory", "8GiB", "--prefetch", "none",
                                                 "--expert-cache-policy", "lfu"]))
    assert got.offload == OffloadConfig("8GiB", "lfu", "none", device="cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")  # the user's wins
    serve_config(parser.parse_args(argv + ["--gpu-memory", "8GiB"]))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"

    args = parser.parse_args(["bench-serve"])
    assert BenchConfig(**given(args, BenchConfig)) == BenchConfig()
    assert args.json is False and args.out is None
    argv = ["bench-serve", "--url", "http://h:1", "--concurrency", "2", "--requests", "3",
            "--model", "m", "--prompt", "p", "--max-tokens", "4", "--temperature", "0.5",
            "--chat", "--no-ignore-eos", "--timeout", "9", "--json", "--out", "r.json"]
    args = parser.parse_args(argv)
    assert BenchConfig(**given(args, BenchConfig)) == BenchConfig(
        "http://h:1", 2, 3, "m", "p", 4, 0.5, True, False, 9.0)
    assert args.json is True and args.out == "r.json"


@pytest.mark.parametrize("argv, message", [
    (["serve"], "the following arguments are required: --model"),
    (["serve", "--model", "m", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["serve", "--model", "m", "--max-batch", "0"], "max_batch=0: must be an integer >= 1"),
    (["bench-serve", "--requests", "0"], "requests=0: must be an integer >= 1"),
    # --out checked before the benchmark runs (it failed after it, losing the results), and an
    # existing file is not overwritten; nothing listens on port 9, so a run would fail anyway
    (["bench-serve", "--url", "http://127.0.0.1:9", "--out", "/nonexistent/x.json"],
     "directory '/nonexistent' does not exist"),
    (["bench-serve", "--url", "http://127.0.0.1:9", "--out", __file__], "already exists"),
])
def test_bad_serve_flags_are_one_line_exit_2(argv, message, capsys):
    from moeflow.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
