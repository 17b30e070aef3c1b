"""How well expert weights pack to 12 bits (expert_store="packed", moeflow.ops.bf16_pack).

The packing is lossless whatever the weights; what depends on them is the size: 3/4 of bf16
plus 6 bytes per exception (a value outside the tensor's most populated window of 15
exponents), and a weight matrix with more than 1/256 exceptions stays raw. This measures, per
checkpoint given with --run (a moeflow run directory or checkpoint, weights cast to bf16 as
`serve --dtype bfloat16` would), and for the random bf16 weights benchmarks/offload.py serves
(--random: one Mixtral-shaped MoE layer built by the model's own init): every expert matrix's
packed size over its bf16 size, its exception share, and how many stayed raw.

Run (CPU, seconds per small checkpoint):
    PYTHONPATH=. python benchmarks/packed_experts.py --out DIR --random --run RUN [--run RUN2]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.ops.bf16_pack import pack_bf16
from moeflow.train.checkpoint import load_for_inference


def measure(model: torch.nn.Module) -> dict:
    ratios, shares, raw, params = [], [], 0, 0
    for layer in model.moe_layers():
        for w in (layer.experts.w_in_EDI, layer.experts.w_out_EFD):
            w = w.detach().to(torch.bfloat16)
            for e in range(w.shape[0]):
                n = w[e].numel()
                params += n
                packed = pack_bf16(w[e])
                if packed is None:
                    raw += 1
                    ratios.append(1.0)
                    continue
                buf, layout = packed
                ratios.append(buf.numel() / (2 * n))
                shares.append(layout.k / n)
    return {"matrices": len(ratios), "raw": raw, "expert_params": params,
            "ratio_mean": sum(ratios) / len(ratios), "ratio_max": max(ratios),
            "exception_share_mean": sum(shares) / max(len(shares), 1),
            "exception_share_max": max(shares, default=0.0)}


def random_mixtral_layer() -> torch.nn.Module:
    """One Mixtral-shaped MoE layer (d 4096, 8 experts of 14336) as benchmarks/offload.py
    builds its models: the model's own init, in bf16."""
    cfg = ModelConfig(arch="llama", vocab_size=256, n_layers=1, d_model=4096, n_heads=32,
                      n_kv_heads=8, moe_kind="moe", moe_every=1, num_experts=8,
                      expert_d_ff=14336, router=RouterConfig(top_k=2, dropless=True))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", action="append", default=[], help="run dir or checkpoint")
    ap.add_argument("--random", action="store_true",
                    help="also a random Mixtral-shaped layer (benchmarks/offload.py's weights)")
    args = ap.parse_args()
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "models": {}}
    for run in args.run:
        model, _ = load_for_inference(run)
        results["models"][run] = {"config": {k: str(v) for k, v in (
            ("d_model", model.config.d_model), ("num_experts", model.config.num_experts),
            ("expert_d_ff", model.config.expert_d_ff))}, **measure(model)}
    if args.random:
        results["models"]["random Mixtral layer (model init)"] = measure(random_mixtral_layer())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_experts.json").write_text(json.dumps(results, indent=1))
    lines = ["| model | expert matrices | stayed raw | packed / bf16 bytes (mean, max) | "
             "exception share (mean, max) |", "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        lines.append(f"| {name} | {r['matrices']} | {r['raw']} | {r['ratio_mean']:.4f}, "
                     f"{r['ratio_max']:.4f} | {r['exception_share_mean']:.2e}, "
                     f"{r['exception_share_max']:.2e} |")
    (out / "packed_experts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
