"""The `moeflow` command line: parses arguments and calls library functions.

Examples:
  moeflow info                                # every preset: layers, experts, parameters
  moeflow info --preset 350m-pr-moe-32-64 --json
  moeflow info --config my_model.yaml
  moeflow demo                                # train `tiny` on the stdlib, ~3 min on 2 cores
  moeflow train --preset tiny --steps 2000 --out runs/tiny --save-every 200
  moeflow train --out runs/tiny --resume       # continue the run as it was configured
  moeflow train --out runs/tiny --resume --steps 3000        # extend it (lr: see --steps)
  moeflow train --config student.yaml --teacher runs/tiny --kd-stop-step 500 --out runs/mos
  torchrun --nproc-per-node 4 -m moeflow train --preset tiny --batch-size 16 --ep 2
  moeflow generate --checkpoint runs/tiny --prompt "def " --temperature 0.8 --top-k 40
  moeflow generate --checkpoint runs/tiny --prompt "def " --stop-sequences "\n\n" return
  moeflow plot runs/tiny                      # loss.png, expert_load.png
  moeflow convert ./Qwen3-30B-A3B ./q3-moeflow --to moeflow   # HF checkpoint -> moeflow
  moeflow convert ./q3-moeflow ./q3-hf --to hf --dtype bfloat16
  moeflow convert runs/tiny ./tiny-hf --to hf    # a run -> transformers (+ tokenizer)
  moeflow upcycle --from runs/dense --experts 8 --top-k 2 --method partition --out runs/moe
  moeflow train --init runs/moe --steps 1000 --out runs/moe-train   # continue from its weights
  moeflow serve --model runs/train --port 8000            # OpenAI-compatible HTTP server
  moeflow serve --model ./q3-moeflow --gpu-memory 24GiB   # experts offloaded to host memory
  moeflow serve --model ./q3-moeflow --gpu-memory 24GiB --expert-store mmap  # larger than RAM
  moeflow bench-serve --url http://127.0.0.1:8000 --concurrency 8 --requests 200
  moeflow forecast train --data sunspots co2 --out runs/fc --steps 2000   # Time-MoE forecaster
  moeflow forecast eval --run runs/fc         # held-out tails vs seasonal-naive, ARIMA, ETS
  moeflow forecast predict --run runs/fc --data my.csv --column sales --horizon 12

`train` flags are generated from moeflow.train.TrainConfig's fields (one flag per field, same
name with dashes) and moeflow.parallel.ParallelConfig's; `generate` flags from
moeflow.infer.SamplingParams, `serve` flags from moeflow.serve.config.ServeConfig,
`bench-serve` flags from moeflow.serve.bench.BenchConfig, `upcycle` flags from
moeflow.interop.upcycle.UpcycleConfig; `forecast train|predict|eval` flags
from moeflow.forecast.config's ForecastTrainConfig (+ ForecastModelConfig overrides),
PredictConfig and EvalConfig.

Errors in what the user gave (unknown preset, malformed config, missing file) print one line
`moeflow: error: ...` and exit with status 2; set MOEFLOW_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from moeflow.config import PRESETS, ModelConfig
from moeflow.validate import check_new_file


# Optional dependencies (pyproject.toml's extras) by the module a command imports.
EXTRAS = {**dict.fromkeys(("starlette", "uvicorn", "pydantic", "httpx", "jinja2",
                           "prometheus_client"), "serve"),
          "statsmodels": "forecast"}


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported in one line (no usage dump), status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"moeflow: error: {message} (see {self.prog} --help)\n")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        optional: bool = False, show_defaults: bool = True) -> None:
    """One flag per field of dataclass `cls` (--field-name, or metadata["flag"]), with the help
    text, choices and metavar of the field's metadata (moeflow.validate.option);
    `show_defaults=False` where the defaults are not what applies (overrides of a preset).

    Defaults stay in the dataclass: flags not given are absent from the namespace (SUPPRESS),
    so `cls(**given)` applies the dataclass's own defaults and validation. A field without a
    default is a required flag, unless `optional` (the whole dataclass is optional: the caller
    builds it only when its required flags are given, see `offload_config`).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        required = missing and not optional
        default = (None if missing else f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "required": required}
        if kind is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            kw.update(nargs="+", type=item, choices=f.metadata.get("choices"),
                      metavar=None if "choices" in f.metadata
                      else "PATH" if item is str else item.__name__.upper())
        elif "choices" in f.metadata:
            kw.update(type=base, choices=f.metadata["choices"])
        else:
            kw["type"] = base
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper() if base is str \
                else base.__name__.upper()
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if show_defaults and not (default is None or default is False or default == ()):
            help_text += f" (default: {default})"
        parser.add_argument(flag, help=help_text, **kw)


def given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of `cls` that the command line set."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def offload_config(args: argparse.Namespace, device: str):
    """The OffloadConfig the --gpu-memory flags ask for, or None without --gpu-memory."""
    from moeflow.infer.offload import OffloadConfig

    fields = given(args, OffloadConfig)
    fields.pop("device", None)  # the command's own --device, passed in as `device`
    if "gpu_memory" not in fields:
        if fields:
            raise UsageError(f"--{next(iter(fields)).replace('_', '-')} needs --gpu-memory")
        return None
    # The budget plans allocated bytes; the caching allocator's default split blocks can hold
    # more than that (1.45 GiB over 23.1 GiB of tensors at 24 GiB, Mixtral shape on an H200:
    # the first prefill hit the cap). Expandable segments keep reserved close to allocated.
    # Read at the first CUDA allocation, which comes later; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return OffloadConfig(**fields, device=device)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if getattr(args, "config", None):
        return ModelConfig.load(args.config)
    return ModelConfig.from_name(args.preset)


def _describe(config: ModelConfig) -> dict:
    from moeflow.model import parameter_counts

    total, active = parameter_counts(config)
    return {
        "name": config.name, "arch": config.arch, "n_layers": config.n_layers,
        "d_model": config.d_model, "moe_layers": list(config.moe_layer_indices()),
        "experts_per_moe_layer": list(config.num_experts), "top_k": config.router.top_k,
        "moe_kind": config.moe_kind if config.is_moe else "dense",
        "total_params": total, "active_params": active,
    }


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    if args.preset or args.config:
        info = _describe(_model_config(args))
        if args.json:
            print(json.dumps(info))
        else:
            width = max(map(len, info))
            for key, value in info.items():
                shown = _human(value) + f" ({value:,})" if key.endswith("_params") else value
                print(f"{key:<{width}}  {shown}")
        return 0
    rows = [_describe(c) for c in PRESETS.values()]
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="moeflow presets")
    for col in ("preset", "arch", "layers", "d_model", "MoE layers × experts", "top-k",
                "total", "active"):
        table.add_column(col, justify="right" if col in ("total", "active") else "left")
    for r in rows:
        experts = sorted(set(r["experts_per_moe_layer"]))
        moe = "dense" if not experts else \
            f"{len(r['moe_layers'])} × {'/'.join(map(str, experts))} ({r['moe_kind']})"
        table.add_row(r["name"], r["arch"], str(r["n_layers"]), str(r["d_model"]), moe,
                      str(r["top_k"]) if experts else "-", _human(r["total_params"]),
                      _human(r["active_params"]))
    console = Console()
    console.width = max(console.width, 120)
    console.print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from moeflow.interop.convert import convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(convert(args.src, args.dst, to=args.to, dtype=dtype,
                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)), overwrite=args.overwrite))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from moeflow.parallel import ParallelConfig
    from moeflow.parallel.trainer import train
    from moeflow.train import TrainConfig
    from moeflow.train.run_config import resume_config

    fields = given(args, TrainConfig)
    if "preset" in fields and "model_config" in fields:
        raise UsageError("--preset and --config are mutually exclusive")
    if "init" in fields and ("preset" in fields or "model_config" in fields):
        raise UsageError("--init takes the network from its checkpoint; leave out --preset and "
                         "--config")
    config = resume_config(fields) if fields.get("resume") else TrainConfig(**fields)
    result = train(config, ParallelConfig(**given(args, ParallelConfig)))
    if result is None:  # not rank 0 of a torchrun launch
        return 0
    print("\n".join(result.summary()))
    return 130 if result.interrupted_by else 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moeflow.infer.engine import Engine, EngineConfig
    from moeflow.infer.sampling import SamplingParams
    from moeflow.infer.text import generate_text
    from moeflow.serve.loader import load_for_serving

    from moeflow.parallel.inference import InferenceParallel

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    par = InferenceParallel(**given(args, InferenceParallel))
    params_given = given(args, SamplingParams)
    if par.world > 1 or "WORLD_SIZE" in os.environ:
        from moeflow.infer.offload import OffloadConfig
        from moeflow.infer.text import generate_text_on_ranks

        if "gpu_memory" in given(args, OffloadConfig):
            raise UsageError("--gpu-memory: expert offloading runs on one process")
        text = generate_text_on_ranks(args.checkpoint, par, args.device, args.prompt,
                                      params_given, tuple(args.stop_strings), args.dtype)
        if text is not None:  # rank 0
            print(args.prompt + text)
        return 0
    offload = offload_config(args, device)
    # Offloading places the model itself (experts to host memory): load it on the CPU.
    loaded = load_for_serving(args.checkpoint, "cpu" if offload else device, args.dtype,
                              map_experts=offload is not None and offload.expert_store == "mmap")
    model, tokenizer = loaded.model, loaded.tokenizer
    params = SamplingParams(**params_given, stop_token_ids=tokenizer.eos_ids)
    engine = Engine(model, EngineConfig(max_batch_size=1, offload=offload))
    text = generate_text(engine, tokenizer, args.prompt, params, stop=tuple(args.stop_strings),
                         group=args.expert_group)
    print(args.prompt + text)
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moeflow.interop.upcycle import UpcycleConfig, upcycle

    print("\n".join(upcycle(UpcycleConfig(**given(args, UpcycleConfig))).summary()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moeflow.train.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from moeflow.reproduce.runner import ReproduceInterrupted, ReproduceOptions, reproduce

    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else ()
    opts = ReproduceOptions(out=args.out, scale=args.scale, only=only, resume=args.resume,
                            data=tuple(args.data or ()), device=args.device,
                            progress=not args.no_progress,
                            command="moeflow " + " ".join(sys.argv[1:]))
    try:
        report = reproduce(opts)
    except ReproduceInterrupted as e:
        print(f"moeflow: interrupted: {e}", file=sys.stderr)
        return 130
    print(f"report: {report}")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from moeflow.data.prepared import DataSpec, prepare_dataset

    spec = DataSpec(source=tuple(args.data), vocab_size=args.vocab_size,
                    val_fraction=args.val_fraction, max_bytes=args.max_bytes,
                    tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                    text_field=args.text_field, group_field=args.group_field,
                    group_rule=args.group_rule)
    prepare_dataset(spec, args.out)
    print(args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moeflow.demo import run_demo

    result = run_demo(steps=args.steps, out=args.out)
    return 0 if result.val_after < result.val_before else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from moeflow.serve.server import serve

    return serve(serve_config(args))


def serve_config(args: argparse.Namespace):
    """ServeConfig from `serve` flags: its own fields, and `offload` from OffloadConfig's."""
    from moeflow.serve.config import ServeConfig

    from moeflow.parallel.inference import InferenceParallel

    fields = given(args, ServeConfig)
    return ServeConfig(**fields, offload=offload_config(args, fields.get("device", "auto")),
                       parallel=InferenceParallel(**given(args, InferenceParallel)))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from moeflow.serve.bench import BenchConfig, run_bench

    if args.out:  # refused before the run, not after it, when its results would be lost
        check_new_file(args.out)
    result = run_bench(BenchConfig(**given(args, BenchConfig)))
    print(json.dumps(result.to_dict()) if args.json else result.table())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    if not result.succeeded:
        status, reason = next(iter(result.reasons.items()))
        print(f"moeflow: error: every request failed; first reason ({status}): {reason}",
              file=sys.stderr)
        return 1
    return 0


def _add_inference_parallel_flags(parser: argparse.ArgumentParser) -> None:
    from moeflow.parallel.inference import InferenceParallel

    group = parser.add_argument_group(
        "several GPUs (under torchrun --nproc-per-node TP*EP, see moeflow.parallel.inference)")
    add_dataclass_flags(group, InferenceParallel)


def _add_offload_flags(parser: argparse.ArgumentParser) -> None:
    from moeflow.infer.offload import OffloadConfig

    group = parser.add_argument_group("expert offloading (serve a model larger than the GPU)")
    add_dataclass_flags(group, OffloadConfig, skip=("device",), optional=True)


def cmd_forecast_train(args: argparse.Namespace) -> int:
    from moeflow.forecast.config import ForecastModelConfig, ForecastTrainConfig
    from moeflow.forecast.train import train_forecaster

    config = ForecastTrainConfig(**given(args, ForecastTrainConfig))
    overrides = given(args, ForecastModelConfig)
    model_config = ForecastModelConfig.from_name(config.preset).replace(**overrides)
    print(train_forecaster(config, model_config).summary())
    return 0


def cmd_forecast_predict(args: argparse.Namespace) -> int:
    from moeflow.forecast.config import PredictConfig
    from moeflow.forecast.predict import predict_csv

    config = PredictConfig(**given(args, PredictConfig))
    text = predict_csv(config)
    if config.out:
        with open(config.out, "x") as f:
            f.write(text)
        print(config.out)
    else:
        print(text, end="")
    return 0


def cmd_forecast_eval(args: argparse.Namespace) -> int:
    from moeflow.forecast.config import EvalConfig
    from moeflow.forecast.evaluate import evaluate

    report = evaluate(EvalConfig(**given(args, EvalConfig)))
    print(report.table())
    print(f"written: {report.out / 'eval.json'}, {report.out / 'forecasts.png'}")
    return 0


def _add_forecast_parsers(sub) -> None:
    from moeflow.forecast.config import (EvalConfig, ForecastModelConfig, ForecastTrainConfig,
                                         PredictConfig)

    p = sub.add_parser("forecast", help="Time-MoE: train, run and evaluate an MoE forecaster "
                                        "on time series (statsmodels datasets or a CSV)")
    fsub = p.add_subparsers(dest="forecast_command", required=True)
    t = fsub.add_parser("train", help="train a forecaster; the last --holdout points of every "
                                      "series are never trained on")
    add_dataclass_flags(t, ForecastTrainConfig)
    add_dataclass_flags(t.add_argument_group("model (overrides the preset's fields)"),
                        ForecastModelConfig, skip=("name", "init_std"), show_defaults=False)
    t.set_defaults(func=cmd_forecast_train)
    t = fsub.add_parser("predict", help="forecast past the end of each series: CSV of points "
                                        "and quantiles")
    add_dataclass_flags(t, PredictConfig)
    t.set_defaults(func=cmd_forecast_predict)
    t = fsub.add_parser("eval", help="MSE/MAE/MASE on the held-out tails vs seasonal-naive, "
                                     "ARIMA and ETS; eval.json and forecasts.png")
    add_dataclass_flags(t, EvalConfig)
    t.set_defaults(func=cmd_forecast_eval)


def _add_serve_parsers(sub) -> None:
    from moeflow.serve.bench import BenchConfig
    from moeflow.serve.config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics)")
    add_dataclass_flags(p, ServeConfig, skip=("offload", "parallel"))
    _add_offload_flags(p)
    _add_inference_parallel_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server: throughput, "
                                           "latency and TTFT percentiles")
    add_dataclass_flags(p, BenchConfig)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench_serve)


def build_parser() -> argparse.ArgumentParser:
    from moeflow.infer.sampling import SamplingParams
    from moeflow.serve.config import DTYPES
    from moeflow.train.run_config import TrainConfig

    from moeflow import __version__

    parser = _Parser(prog="moeflow", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters and layout of presets or a config file")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    group.add_argument("--config", help="a model config file (.json or .yaml)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "train", help="train a model (default corpus: the Python standard library's source)",
        description="Train a model. With no --data, the corpus is the source files (.py) of the "
                    "running Python interpreter's standard library: nothing to download.")
    add_dataclass_flags(p, TrainConfig)
    from moeflow.parallel.mesh import ParallelConfig
    add_dataclass_flags(p.add_argument_group("parallel (under torchrun, see moeflow.parallel)"),
                        ParallelConfig)
    p.set_defaults(func=cmd_train)

    generate_help = "generate text from a checkpoint (through the serving engine)"
    p = sub.add_parser(
        "generate", help=generate_help,
        description="Continue a prompt with a trained checkpoint. It runs through the serving "
                    "engine, as `moeflow serve` does (KV cache, dropless routing); there is no "
                    "uncached mode: the tests check the engine against a full forward.")
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its latest checkpoint), a checkpoint directory, or a "
                        "moeflow/HF checkpoint directory with a tokenizer.json (as `serve`)")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    add_dataclass_flags(p, SamplingParams, skip=("stop_token_ids", "stop_sequences"))
    p.add_argument("--stop-sequences", nargs="+", metavar="TEXT", default=[], dest="stop_strings",
                   help="stop when the generated text contains one of these strings; the output "
                        "ends just before it (end-of-text always stops)")
    p.add_argument("--expert-group", metavar="NAME", default=None,
                   help="models with expert groups: the group of the prompt and the generation")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast the weights (default: as stored; --expert-store packed needs "
                        "bfloat16)")
    _add_offload_flags(p)
    _add_inference_parallel_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="PNG plots of a run: loss vs tokens, expert-load heatmap")
    p.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    p.set_defaults(func=cmd_plot)

    demo_help = ("train `tiny` on the running Python's standard-library sources (no download), "
                 "show the validation loss falling, expert loads and a sample (~2-3 min)")
    p = sub.add_parser("demo", help=demo_help, description=demo_help)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the demo's own, see moeflow/demo.py)")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary one)")
    p.set_defaults(func=cmd_demo)

    from moeflow.reproduce.family import STAGES
    from moeflow.reproduce.scale import SCALES

    p = sub.add_parser(
        "reproduce", help="train the paper's model family at small scale and report which of "
                          "its claims hold (MoE vs dense, PR-MoE, MoS, inference speed)",
        description="Train dense-S/M/L, moe-S, pr-moe-S and three Mixture-of-Students on one "
                    "prepared corpus with one schedule, time them in the engine, and write "
                    "OUT/report.md with each paper claim and its measurement.")
    p.add_argument("--out", required=True, help="directory for data, runs and the report")
    p.add_argument("--scale", choices=list(SCALES),
                   help="gpu: one H200, ~8 min (default); smoke: a few steps per stage on CPU")
    p.add_argument("--only", help=f"comma-separated stages to (re)train: {', '.join(STAGES)}")
    p.add_argument("--resume", action="store_true",
                   help="continue the reproduction in --out (finished stages are kept)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="your own text files, directories or JSONL instead of the built-in "
                        "corpus (every source and text file of the running Python)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    from moeflow.data.groups import GROUP_RULES
    from moeflow.data.prepared import DataSpec as D

    p = sub.add_parser("prepare-data", help="tokenize a corpus once into a directory that "
                                            "`train --data DIR` reads")
    p.add_argument("--out", required=True, help="the dataset directory to create")
    p.add_argument("--data", nargs="+", metavar="PATH", default=list(D.source),
                   help="files, directories, JSONL, builtin:stdlib or builtin:interpreter "
                        f"(default: {D.source[0]})")
    p.add_argument("--vocab-size", type=int, default=D.vocab_size)
    p.add_argument("--val-fraction", type=float, default=D.val_fraction)
    p.add_argument("--max-bytes", type=int, help="builtin:interpreter: read at most this much")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=D.tokenizer_sample_bytes,
                   help="training text the BPE tokenizer learns from")
    p.add_argument("--text-field", default=D.text_field, help="JSONL field holding the text")
    p.add_argument("--group-field", help="expert groups: store each JSONL record's group, "
                                         "named in this field")
    p.add_argument("--group-rule", choices=GROUP_RULES,
                   help="expert groups: store every token's label by this rule instead")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("convert", help="convert a checkpoint between moeflow and HF layouts",
                       description="Convert a checkpoint between moeflow's and HF transformers' "
                                   "layouts, with its tokenizer and generation config. GPT-family "
                                   "models export as `moeflow_gpt`, loaded by transformers with "
                                   "trust_remote_code=True (moeflow/interop/hf_config.py).")
    p.add_argument("src", help="what `serve` and `generate` load: a training run or checkpoint "
                               "directory, a moeflow export, or a HF checkpoint (Mixtral, "
                               "Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3)")
    p.add_argument("dst", help="output directory (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--to", choices=("hf", "moeflow"), required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast weights (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit")
    p.set_defaults(func=cmd_convert)

    from moeflow.interop.upcycle import UpcycleConfig

    p = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE (sparse upcycling or "
                                       "Read-ME neuron partitions) that train --init continues",
                       description="Turn a dense moeflow or HF Llama/Qwen2 checkpoint into an "
                                   "MoE; see moeflow/interop/upcycle.py.")
    add_dataclass_flags(p, UpcycleConfig)
    p.set_defaults(func=cmd_upcycle)
    _add_serve_parsers(sub)
    _add_forecast_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").partition(".")[0])
        if extra is None or os.environ.get("MOEFLOW_DEBUG"):
            raise
        print(f"moeflow: error: `moeflow {args.command}` needs {e.name}, which comes with the "
              f"{extra!r} extra: pip install 'moeflow[{extra}]'", file=sys.stderr)
        return 2
    except (UsageError, ValueError, OSError) as e:
        if os.environ.get("MOEFLOW_DEBUG"):
            raise
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from moeflow.train.trainer import NonFiniteLossError

        out_of_memory = (type(e).__name__ == "OutOfMemoryError"  # torch's, on a GPU
                         or "can't allocate memory" in str(e))  # the CPU allocator's
        if os.environ.get("MOEFLOW_DEBUG") or not (
                isinstance(e, NonFiniteLossError) or out_of_memory):
            raise
        message = str(e).strip().splitlines()[0]
        if out_of_memory:
            message = "out of memory: " + message.split("DefaultCPUAllocator: ")[-1]
        print(f"moeflow: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moeflow: interrupted", file=sys.stderr)
        return 130
