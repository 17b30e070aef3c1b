"""Train the same small MoE model twice, on the fast kernels and on the plain-torch references,
and check that the loss curves agree within bf16 tolerance.

    PYTHONPATH=. python benchmarks/train_parity.py --steps 30 --out benchmarks/results

Why a training run and not only the per-op parity tests: the ops tests compare one forward and
backward; a few optimizer steps show that every gradient the kernels produce (router through
the routing weights and losses, dispatch/combine, grouped expert GEMMs, activation) is the one
training needs, because a wrong or missing gradient bends the loss curve within a few steps.

Both runs start from the same weights and see the same batches (a learnable synthetic language:
a sparse random Markov chain, so the loss falls well below log V). Paths differ only in the
backends: "fast" = router "triton", dispatch "triton", experts "auto" (grouped_mm + fused
activation while training); "reference" = all "reference". The model is bf16 end to end (the
fast expert path runs in bf16 on sm90+). Two models: capacity-limited softmax top-2 (drops, so
parked rows), and dropless sigmoid top-2 with groups, expert bias and a shared expert.

Pass criterion (bf16): every step's loss within 2 % of the reference run's, and the mean
absolute difference over the steps below 1 %. Prints one line per step and writes JSON with the
per-step losses, the maximum and mean relative differences and the verdict.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from moeflow.config import ModelConfig, RouterConfig
from moeflow.model.transformer import Transformer
from moeflow.ops.backend import Backends

MAX_STEP_REL = 0.02
MAX_MEAN_REL = 0.01


def model_config(dropless: bool) -> ModelConfig:
    if dropless:
        router = RouterConfig(top_k=2, score_func="sigmoid", dropless=True, normalize_topk=True,
                              num_groups=4, topk_groups=2, expert_bias=True, aux_loss_coef=0.01)
    else:
        router = RouterConfig(top_k=2, capacity_factor=1.25, min_capacity=4, aux_loss_coef=0.01,
                              z_loss_coef=1e-3)
    return ModelConfig(name="parity", arch="llama", vocab_size=4096, n_layers=4, d_model=512,
                       n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=256, moe_every=1,
                       first_moe_layer=0, num_experts=16, expert_d_ff=512,
                       num_shared_experts=1 if dropless else 0, router=router)


def markov_batches(vocab: int, steps: int, batch: int, seq: int, seed: int, device: str):
    """A sparse random Markov chain: each token has 4 possible successors."""
    g = torch.Generator().manual_seed(seed)
    succ_V4 = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.randint(0, 4, (batch, seq), generator=g)
        for t in range(seq):
            ids[:, t + 1] = succ_V4[ids[:, t], choice[:, t]]
        out.append(ids.to(device))
    return out


def train(cfg: ModelConfig, state: dict, batches, fast: bool, lr: float) -> list[float]:
    paths = Backends(router="triton", dispatch="triton") if fast else Backends.reference()
    model = Transformer(cfg, backends=paths).to("cuda")
    model.load_state_dict(state)
    model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, eps=1e-6)
    losses = []
    for ids in batches:
        out = model(ids[:, :-1])
        lm = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1),
                                               ids[:, 1:].flatten())
        (lm + out.router_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.router.expert_bias:
            model.update_expert_biases([r.counts_E for r in out.routing])
        losses.append(lm.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv), "runs": {}}
    ok = True
    for dropless in (False, True):
        cfg = model_config(dropless)
        state = Transformer(cfg).state_dict()
        batches = markov_batches(cfg.vocab_size, args.steps, args.batch, cfg.max_seq_len, 1,
                                 "cuda")
        ref = train(cfg, state, batches, fast=False, lr=args.lr)
        fast = train(cfg, state, batches, fast=True, lr=args.lr)
        rel = [abs(a - b) / abs(b) for a, b in zip(fast, ref)]
        name = "dropless-sigmoid-shared" if dropless else "capacity-top2"
        passed = max(rel) < MAX_STEP_REL and sum(rel) / len(rel) < MAX_MEAN_REL
        ok &= passed
        report["runs"][name] = {"reference": ref, "fast": fast, "max_rel": max(rel),
                                "mean_rel": sum(rel) / len(rel), "passed": passed}
        for i, (a, b) in enumerate(zip(ref, fast)):
            print(f"{name} step {i:3d}: reference {a:.4f} fast {b:.4f} rel {rel[i]:.2e}")
        print(f"{name}: max rel {max(rel):.3e}, mean rel {sum(rel) / len(rel):.3e}, "
              f"loss {ref[0]:.3f} -> {ref[-1]:.3f}: {'PASS' if passed else 'FAIL'}", flush=True)
    report["passed"] = ok
    os.makedirs(args.out, exist_ok=True)
    gpu = report["gpu"].replace(" ", "-")
    with open(os.path.join(args.out, f"train_parity_{gpu}_{report['date']}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
