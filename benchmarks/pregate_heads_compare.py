"""Which pre-gate head to train: hit rates of zero-shot pre-gating and of head variants, per MoE
layer, on held-out text of a trained model (CPU).

The backbone is frozen while heads train (moeflow.train.pregate), so what a head sees and what
it must predict are fixed functions of the text: this script runs the backbone once over
training and held-out windows, keeps each MoE layer's input and routing, and trains every
variant on those cached features (minutes instead of one backbone forward per head step).
The figure is the one `moeflow train --pregate` validates and the offloading engine's prefetch
sees at batch 1: recall of MoE layer l+1's true top-k (token, expert) assignments by the k
experts predicted from layer l, per token (moeflow.model.pregate.topk_recall). Recall of a
prediction of k+1 and 2k experts is reported beside it (a prefetch may copy more than k).

Variants (head l: MoE layer l's input -> logits over layer l+1's experts):
  zero-shot         layer l+1's router on layer l's normalised FFN input (no training)
  linear/topk-ce    a linear map initialised from layer l+1's router gate, cross-entropy to the
                    uniform distribution over the true top-k (the trainer's objective before)
  linear/kl         same map, KL to layer l+1's own routing distribution (its softmax on its
                    own input: soft targets carry the runner-up experts too)
  linear/bce        same map, one sigmoid per expert against the top-k membership
  mlp-R/<loss>      the linear map plus a rank-R residual MLP on the normalised input,
                    U·gelu(V·x) with U zero-initialised (starts at zero-shot's predictions)
  <head>@block-in   the same head fed layer l's block input (before layer l's attention,
                    normalised by layer l's FFN norm): a prediction a whole attention earlier
  <head>@embed      the same head fed the token's embedding only (Read-ME-style lookahead:
                    every layer's experts known as soon as the token is sampled)
  mlp2-R/<loss>     two hidden layers of width R (U·gelu(V2·gelu(V1·x)))
  <head>@A+B+...    the MLP sees the concatenation of several inputs (the linear map sees the
                    first): route (layer l's own router distribution and its top-k one-hot,
                    known before layer l's experts run), rms (log RMS of layer l's residual
                    before the FFN norm: the norm hides how far layer l's FFN output can turn
                    it), prev (the previous token's ffn_in at layer l), prevnext (the previous
                    token's experts at layer l+1: both known at decode from the last step)
Diagnostics (not available at layer l's prefetch point; they bound what any head can reach):
  after-ffn         layer l+1's router on the residual after layer l's FFN (normalised by layer
                    l+1's FFN norm): everything but layer l+1's attention is known
Run (CPU, a few minutes on 2 cores; writes heads_compare.json and heads_compare.md):
    PYTHONPATH=. python benchmarks/pregate_heads_compare.py --run /tmp/h2/base \
        --out benchmarks/results/offload
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.data.corpus import load_corpus, split_documents
from moeflow.model.pregate import topk_recall
from moeflow.train.checkpoint import load_for_inference, load_run_config, resolve_checkpoint


def windows_of(ckpt: Path, tokenizer, length: int, train_count: int, val_count: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[W, length] windows of the run's training and validation documents (its own split)."""
    run = load_run_config(ckpt)
    train_docs, val_docs = split_documents(load_corpus(run.data, run.text_field),
                                           run.val_fraction)

    def cut(docs, count, seed):  # encodes shuffled documents until there are enough tokens
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
        texts, chars = [], 0
        for i in order.tolist():
            if chars > 8 * length * count:  # > 2 characters per token on code
                break
            texts.append(docs[i].text)
            chars += len(docs[i].text)
        ids = torch.from_numpy(tokenizer.encode_documents(texts)).long()
        n = ids.numel() // length
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
        return ids[:n * length].view(n, length)[pick.sort().values]

    return cut(train_docs, train_count, 0), cut(val_docs, val_count, 1)


@torch.no_grad()
def features(model, windows_WT: torch.Tensor, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer: ffn_in (its normalised input), block_in (its block's input under its FFN
    norm), embed (the token embedding, the same for every layer), resid_out (the residual
    after its FFN, raw), moe_out (its FFN's output), ids (served top-k), logits (its router's
    logits on ffn_in)."""
    blocks = [b for b in model.blocks if b.ffn in model.moe_layers()]
    out: list[dict[str, list]] = [dict(ffn_in=[], block_in=[], resid_out=[], ids=[], logits=[],
                                       embed=[], moe_out=[]) for _ in blocks]

    def embed(mod, args, res):
        for d in out:
            d["embed"].append(res.flatten(0, 1))
    hooks = [model.tok_emb.register_forward_hook(embed)]
    for j, b in enumerate(blocks):
        def pre(mod, args, j=j):
            out[j]["block_in"].append(mod.ffn_norm(args[0]).flatten(0, 1))

        def post(mod, args, res, j=j):
            out[j]["resid_out"].append(res[0].flatten(0, 1))

        def moe(mod, args, res, j=j):
            x_TD = args[0].flatten(0, 1)
            out[j]["ffn_in"].append(x_TD)
            out[j]["ids"].append(res[1].ids_TK)
            out[j]["moe_out"].append(res[0].flatten(0, 1))
            out[j]["logits"].append(F.linear(x_TD.float(), mod.router.gate.weight.float()))
        hooks += [b.register_forward_pre_hook(pre), b.register_forward_hook(post),
                  b.ffn.register_forward_hook(moe)]
    try:
        for i in range(0, windows_WT.shape[0], batch):
            model(windows_WT[i:i + batch], inference=True)
    finally:
        for h in hooks:
            h.remove()
    return [{k: torch.cat(v) for k, v in d.items()} for d in out]


def input_of(feats: list[dict[str, torch.Tensor]], l: int, source: str, length: int
             ) -> torch.Tensor:
    """[T, F] input of head l: the named features concatenated (module docstring)."""
    parts = []
    for name in source.split("+"):
        f = feats[l]
        if name == "route":
            probs = f["logits"].softmax(-1)
            parts.append(torch.cat([probs, torch.zeros_like(probs).scatter_(1, f["ids"], 1.0)],
                                   dim=1))
        elif name == "rms":
            mid = f["resid_out"] - f["moe_out"]
            parts.append(mid.float().pow(2).mean(-1, keepdim=True).sqrt().log())
        elif name in ("prev", "prevnext"):
            if name == "prev":
                cur = f["ffn_in"].float()
            else:
                nxt = feats[l + 1]
                cur = torch.zeros_like(nxt["logits"]).scatter_(1, nxt["ids"], 1.0)
            prev = torch.roll(cur, 1, dims=0)
            prev[::length] = 0  # the first token of each window has no previous token here
            parts.append(prev)
        else:
            parts.append(f[name].float())
    return torch.cat(parts, dim=1)


class Head(torch.nn.Module):
    """logits = W·x[:D] (+ U·gelu(V·x) when rank > 0, two hidden layers with depth 2); W starts
    as the next router's gate, U at zero."""

    def __init__(self, gate_ED: torch.Tensor, rank: int, in_features: int, depth: int = 1
                 ) -> None:
        super().__init__()
        E, D = gate_ED.shape
        self.d = D
        self.w = torch.nn.Parameter(gate_ED.float().clone())
        self.rank = rank
        if rank:
            hidden = [torch.nn.Linear(in_features, rank), torch.nn.GELU()]
            for _ in range(depth - 1):
                hidden += [torch.nn.Linear(rank, rank), torch.nn.GELU()]
            self.v = torch.nn.Sequential(*hidden)
            self.u = torch.nn.Linear(rank, E)
            torch.nn.init.zeros_(self.u.weight)
            torch.nn.init.zeros_(self.u.bias)

    def forward(self, x_TF: torch.Tensor) -> torch.Tensor:
        y = F.linear(x_TF[:, :self.d], self.w)
        if self.rank:
            y = y + self.u(self.v(x_TF))
        return y


def loss_of(kind: str, logits_TE, ids_TK, teacher_TE) -> torch.Tensor:
    if kind == "topk-ce":
        target = torch.zeros_like(logits_TE).scatter_(1, ids_TK, 1.0 / ids_TK.shape[1])
        return -(target * logits_TE.log_softmax(-1)).sum(-1).mean()
    if kind == "kl":
        return F.kl_div(logits_TE.log_softmax(-1), teacher_TE.log_softmax(-1), log_target=True,
                        reduction="batchmean")
    if kind == "bce":
        target = torch.zeros_like(logits_TE).scatter_(1, ids_TK, 1.0)
        return F.binary_cross_entropy_with_logits(logits_TE, target, reduction="sum") / \
            logits_TE.shape[0]
    raise ValueError(kind)


def train_head(gate_ED, rank, depth, kind, x_TD, ids_TK, teacher_TE, steps, lr, batch,
               weight_decay, seed=0):
    torch.manual_seed(seed)
    head = Head(gate_ED, rank, x_TD.shape[1], depth)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup 5%, cosine to 10%
            frac = step / steps
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 20)) * (
                0.1 + 0.45 * (1 + torch.cos(torch.tensor(frac * torch.pi)).item()))
        pick = torch.randint(0, x_TD.shape[0], (batch,), generator=g)
        loss = loss_of(kind, head(x_TD[pick]), ids_TK[pick], teacher_TE[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


def recalls(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> dict[str, float]:
    k = ids_TK.shape[1]
    out = {}
    for name, size in (("k", k), ("k+1", k + 1), ("2k", 2 * k)):
        hits, total = topk_recall(logits_TE.topk(size, dim=-1).indices, ids_TK)
        out[name] = hits / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained run or checkpoint (the backbone)")
    ap.add_argument("--train-windows", type=int, default=512)
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--tag", default="", help="results go to heads_compare[_TAG].json/.md")
    ap.add_argument("--variants", default="linear/topk-ce,linear/kl,mlp-64/topk-ce,"
                    "mlp-64/kl,mlp-256/topk-ce,mlp-64/topk-ce@block_in",
                    help="HEAD/LOSS[@INPUT]: HEAD linear, mlp-RANK or mlp2-RANK, LOSS topk-ce, "
                    "kl or bce, INPUT ffn_in (default), block_in, embed, or A+B+... with "
                    "route, rms, prev, prevnext (module docstring)")
    ap.add_argument("--out", default="benchmarks/results/offload")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    ckpt = resolve_checkpoint(args.run)
    model, tokenizer = load_for_inference(ckpt)
    model.requires_grad_(False)
    length = model.config.max_seq_len
    train_WT, val_WT = windows_of(ckpt, tokenizer, length, args.train_windows, args.val_windows)
    tr, va = features(model, train_WT), features(model, val_WT)
    moe = model.moe_layers()
    blocks = [b for b in model.blocks if b.ffn in moe]
    variants = []
    for v in args.variants.split(","):
        spec, _, source = v.partition("@")
        name, kind = spec.split("/")
        depth = 2 if name.startswith("mlp2-") else 1
        rank = 0 if name == "linear" else int(name.split("-")[1])
        variants.append((name, rank, depth, kind, source or "ffn_in"))
    rows = []
    for l in range(len(moe) - 1):
        gate_ED = moe[l + 1].router.gate.weight.detach()
        true_tr, true_va = tr[l + 1]["ids"], va[l + 1]["ids"]
        row = {"layer_pair": [l, l + 1]}
        row["zero-shot"] = recalls(F.linear(va[l]["ffn_in"].float(), gate_ED.float()), true_va)
        resid = blocks[l + 1].ffn_norm(va[l]["resid_out"])
        row["after-ffn (diagnostic)"] = recalls(F.linear(resid.float(), gate_ED.float()), true_va)
        row["zero-shot@block-in"] = recalls(F.linear(va[l]["block_in"].float(),
                                                     gate_ED.float()), true_va)
        for name, rank, depth, kind, source in variants:
            x_tr = input_of(tr, l, source, length)
            head = train_head(gate_ED, rank, depth, kind, x_tr, true_tr, tr[l + 1]["logits"],
                              args.steps, args.lr, args.batch, args.weight_decay)
            with torch.no_grad():
                label = f"{name}/{kind}" + ("" if source == "ffn_in" else f"@{source}")
                row[label + " (train)"] = recalls(head(x_tr[:len(true_va)]),
                                                  true_tr[:len(true_va)])
                row[label] = recalls(head(input_of(va, l, source, length)), true_va)
            print(f"pair {l}->{l + 1} {label}: {row[label]['k']:.3f}", flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    methods = [k for k in rows[0] if k != "layer_pair"]
    mean = {m: {s: sum(r[m][s] for r in rows) / len(rows) for s in ("k", "k+1", "2k")}
            for m in methods}
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
              "checkpoint": str(ckpt), "args": vars(args), "model": model.config.to_dict(),
              "train_tokens": int(tr[0]["ids"].shape[0]), "val_tokens": int(va[0]["ids"].shape[0]),
              "per_layer": rows, "mean": mean, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"heads_compare_{args.tag}" if args.tag else "heads_compare"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    pairs = [f"{r['layer_pair'][0]}->{r['layer_pair'][1]}" for r in rows]
    lines = ["| method | " + " | ".join(pairs) + " | mean (k) | mean (k+1) | mean (2k) |",
             "|---" * (len(pairs) + 4) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{r[m]['k']:.3f}" for r in rows) +
                     f" | {mean[m]['k']:.3f} | {mean[m]['k+1']:.3f} | {mean[m]['2k']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
