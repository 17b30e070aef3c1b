"""The `moeflow` command line: parses arguments and calls library functions.

Examples:
  moeflow info                                # every preset: layers, experts, parameters
  moeflow info --preset 350m-pr-moe-32-64 --json
  moeflow info --config my_model.yaml
  moeflow convert ./Qwen3-30B-A3B ./q3-moeflow --to moeflow   # HF checkpoint -> moeflow
  moeflow convert ./q3-moeflow ./q3-hf --to hf --dtype bfloat16
  moeflow serve --model runs/train --port 8000            # OpenAI-compatible HTTP server
  moeflow bench-serve --url http://127.0.0.1:8000 --concurrency 8 --requests 200

Errors in what the user gave (unknown preset, malformed config, missing file) print one line
`moeflow: error: ...` and exit with status 2; set MOEFLOW_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeflow.config import ModelConfig
from moeflow.presets import PRESETS, preset


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if getattr(args, "config", None):
        if not os.path.isfile(args.config):
            raise UsageError(f"config file {args.config!r} does not exist")
        return ModelConfig.load(args.config)
    return preset(args.preset)


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

    from moeflow.interop import convert

    if not os.path.isdir(args.src):
        raise UsageError(f"checkpoint directory {args.src!r} does not exist")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(convert(args.src, args.dst, to=args.to, dtype=dtype,
                  max_shard_bytes=int(args.max_shard_gb * (1 << 30))))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moeflow.serve.config import ServeConfig
    from moeflow.serve.server import serve

    fields = {k: v for k, v in vars(args).items() if k in ServeConfig.__dataclass_fields__}
    return serve(ServeConfig(**fields))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from moeflow.serve.bench import BenchConfig, run_bench

    fields = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__}
    result = run_bench(BenchConfig(**fields))
    print(json.dumps(result.to_dict()) if args.json else result.table())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0 if result.succeeded else 1


def _add_serve_parsers(sub) -> None:
    from moeflow.serve.config import ServeConfig as S

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics)")
    p.add_argument("--model", required=True, help="checkpoint: a training run / checkpoint "
                   "directory, or a moeflow or HF MoE directory with tokenizer.json")
    p.add_argument("--served-model-name", help="the name clients send (default: directory name)")
    p.add_argument("--host", default=S.host)
    p.add_argument("--port", type=int, default=S.port)
    p.add_argument("--max-batch", type=int, default=S.max_batch,
                   help="sequences the engine runs per step")
    p.add_argument("--max-queue", type=int, default=S.max_queue,
                   help="sequences waiting for a batch slot; beyond it requests get 429")
    p.add_argument("--max-seq-len", type=int, help="context window (default: the model's)")
    p.add_argument("--cache-tokens", type=int, help="KV cache capacity in tokens")
    p.add_argument("--max-body-bytes", type=int, default=S.max_body_bytes,
                   help="larger request bodies get 413 without being parsed")
    p.add_argument("--drain-timeout", type=float, default=S.drain_timeout,
                   help="seconds SIGTERM waits for in-flight requests before aborting them")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S.device)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--default-max-tokens", type=int, default=S.default_max_tokens,
                   help="max_tokens of /v1/completions requests that set none")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default on CPU: cores - 1, one left for HTTP)")
    p.add_argument("--log-level", default=S.log_level,
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)

    from moeflow.serve.bench import BenchConfig as B

    p = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server: throughput, "
                                           "latency and TTFT percentiles")
    p.add_argument("--url", default=B.url)
    p.add_argument("--concurrency", type=int, default=B.concurrency)
    p.add_argument("--requests", type=int, default=B.requests)
    p.add_argument("--model", help="model name (default: the server's first)")
    p.add_argument("--prompt", default=B.prompt)
    p.add_argument("--max-tokens", type=int, default=B.max_tokens)
    p.add_argument("--temperature", type=float, default=B.temperature)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end at end-of-sequence (default: exactly max-tokens)")
    p.add_argument("--timeout", type=float, default=B.timeout, help="per-request seconds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters and layout of presets or a config file")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    group.add_argument("--config", help="a model config file (.json or .yaml)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint between moeflow and HF layouts")
    p.add_argument("src", help="checkpoint directory (moeflow or HF: Mixtral, Qwen2/3-MoE, "
                               "OLMoE, DeepSeek-V2/V3)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "moeflow"), required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast weights (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit")
    p.set_defaults(func=cmd_convert)
    _add_serve_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, OSError) as e:
        if os.environ.get("MOEFLOW_DEBUG"):
            raise
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeflow: interrupted", file=sys.stderr)
        return 130
