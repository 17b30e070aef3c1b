"""One shared expert pool vs modality expert groups (MoMa-style), at equal active parameters.

Both models are the same decoder with E experts of the same size per MoE layer, top-1: the
"shared" model routes every token over all E experts; the "grouped" model splits them into
`code` and `text` groups (E/2 each) and routes each token top-1 inside its group
(moeflow.model.expert_groups), the group given by moeflow.data.modality's labeller (Python
`tokenize`: comments and string literals are text, the rest code; .md/.rst/.txt files text).
Total and active parameters and FLOPs per token are equal by construction (one expert of the
same size per token, the same router width); what differs is only which experts a token may
use. Data: a sample of `builtin:interpreter`. Reports validation loss overall and per modality.

The training loop here is a plain AdamW loop over moeflow's model, identical for both models:
same data order, seed and schedule. (It predates `moeflow train --group-rule modality`, which
trains a grouped model on the same labels; the recorded results come from this script.)

    nice python benchmarks/expert_groups_compare.py --out benchmarks/results/expert_groups
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeflow.config import ModelConfig, RouterConfig
from moeflow.data.corpus import interpreter_documents, split_documents
from moeflow.data.modality import MODALITIES, encode_labelled
from moeflow.data.tokenizer import BPETokenizer
from moeflow.model import Transformer
from moeflow.model.transformer import count_parameters


def model_config(args, grouped: bool) -> ModelConfig:
    half = args.experts // 2
    groups = (("code", half), ("text", args.experts - half)) if grouped else ()
    return ModelConfig(arch="llama", vocab_size=args.vocab, n_layers=args.layers,
                       d_model=args.d_model, n_heads=4, max_seq_len=args.seq_len,
                       d_ff=4 * args.d_model, expert_d_ff=2 * args.d_model,
                       moe_every=1, num_experts=args.experts,
                       router=RouterConfig(top_k=1, dropless=True, expert_groups=groups))


def windows(tokens: np.ndarray, groups: np.ndarray, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(tokens) - 1) // L
    idx = np.arange(n)[:, None] * L + np.arange(L + 1)
    return torch.from_numpy(tokens[idx].astype(np.int64)), torch.from_numpy(groups[idx].astype(
        np.int64))


def evaluate(model, tok_W, grp_W, grouped: bool, batch: int) -> dict:
    model.eval()
    sums = torch.zeros(len(MODALITIES), dtype=torch.float64)
    counts = torch.zeros(len(MODALITIES), dtype=torch.float64)
    load = None
    with torch.no_grad():
        for i in range(0, len(tok_W), batch):
            x, g = tok_W[i:i + batch], grp_W[i:i + batch]
            out = model(x[:, :-1], groups=g[:, :-1] if grouped else None)
            ce = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            tgt_g = g[:, 1:].flatten()  # a prediction's modality is its target token's
            sums += torch.zeros_like(sums).index_add_(0, tgt_g, ce.double())
            counts += torch.bincount(tgt_g, minlength=len(MODALITIES)).double()
            c = torch.stack([r.counts_E for r in out.routing])
            load = c if load is None else load + c
    model.train()
    per = {m: float(sums[i] / counts[i]) for i, m in enumerate(MODALITIES)}
    return {"val_loss": float(sums.sum() / counts.sum()), "per_modality": per,
            "tokens_per_modality": {m: int(counts[i]) for i, m in enumerate(MODALITIES)},
            "expert_load": load.tolist()}


def train(args, grouped: bool, train_W, val_W) -> dict:
    cfg = model_config(args, grouped)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    total, active = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    tok_W, grp_W = train_W
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, len(tok_W), (args.batch,), generator=gen)
        x, g = tok_W[pick], grp_W[pick]
        out = model(x[:, :-1], groups=g[:, :-1] if grouped else None)
        ce = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (ce + out.router_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(ce.detach()))
    seconds = time.perf_counter() - t0
    result = evaluate(model, *val_W, grouped, args.batch)
    return {"grouped": grouped, "expert_groups": [list(x) for x in cfg.router.expert_groups],
            "params_total": total, "params_active": active, "train_seconds": seconds,
            "final_train_loss_mean_last20": float(np.mean(losses[-20:])), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/expert_groups")
    p.add_argument("--bytes", type=int, default=3_000_000, help="sample of builtin:interpreter")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)

    docs, _ = interpreter_documents(max_bytes=args.bytes)
    train_docs, val_docs = split_documents(docs, 0.1)
    tok = BPETokenizer.train((d.text for d in train_docs), args.vocab)
    data = {}
    for split, ds in (("train", train_docs), ("val", val_docs)):
        t, g = encode_labelled(tok, [d.name for d in ds], [d.text for d in ds])
        data[split] = windows(t, g, args.seq_len)
    val = tuple(w[:: max(1, len(w) // args.val_windows)][: args.val_windows]
                for w in data["val"])
    share = {m: float((data["train"][1] == i).float().mean()) for i, m in enumerate(MODALITIES)}

    runs = {name: train(args, grouped, data["train"], val)
            for name, grouped in (("shared_pool", False), ("grouped", True))}
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, CPU, torch "
                         f"{torch.__version__}, {torch.get_num_threads()} threads",
              "command": "nice python benchmarks/expert_groups_compare.py "
                         + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                    vars(args).items()),
              "args": vars(args), "train_token_share": share,
              "train_windows": len(data["train"][0]), "val_windows": len(val[0]),
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| model | params total / active | val loss | " +
             " | ".join(f"val loss {m}" for m in MODALITIES) + " | train s |",
             "|---|---|---|" + "---|" * len(MODALITIES) + "---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['params_total']:,} / {r['params_active']:,} | "
                     f"{r['val_loss']:.4f} | " +
                     " | ".join(f"{r['per_modality'][m]:.4f}" for m in MODALITIES) +
                     f" | {r['train_seconds']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
