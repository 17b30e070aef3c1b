"""The `moeflow` command line: parses arguments and calls library functions.

Examples:
  moeflow info                                # every preset: layers, experts, parameters
  moeflow info --preset 350m-pr-moe-32-64 --json
  moeflow info --config my_model.yaml
  moeflow convert ./Qwen3-30B-A3B ./q3-moeflow --to moeflow   # HF checkpoint -> moeflow
  moeflow convert ./q3-moeflow ./q3-hf --to hf --dtype bfloat16

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
