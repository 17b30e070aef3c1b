"""Which expert-cache eviction policy to use by default: routing traces replayed through the
cache policies at several cache sizes, on the CPU.

Why a replay and not the GPU benchmark: the hit rate depends only on the sequence of (MoE layer,
experts) accesses and on the policy, not on the device; a replay can use the routing of a
*trained* model (locality: popular experts, experts reused by consecutive tokens), which the
GPU benchmark's random-weight models do not have.

Traces (one access = the distinct experts one MoE layer computes with in one decode step; layers
are visited in order, 0..L-1, every step, which is how the engine decodes):
  * trained: a small Llama-style MoE (8 MoE layers, 16 experts, top-2, byte vocabulary)
    trained here for --steps steps on 4 MB of builtin:interpreter (AdamW, the router's
    balancing losses included), then run over held-out windows (teacher-forced: the routing
    decode would see for that text); batch 1 = one window after the other, batch 16 = 16
    windows side by side (union of their experts);
  * uniform: each token picks top_k distinct experts uniformly at random (random weights'
    routing), same shape and length.
Policies: the engine's own ExpertCache ("lru", "lfu", and any other it offers), run on the CPU
with one-element experts, plus Belady's MIN (evicts the expert whose next use is furthest in
the future: the optimum, needs the future, reference only). Pins as in the engine: the layer's
own experts are not evicted while it acquires them.

Expected, and checked here: at batch 1 the accesses repeat with period L (layers visited
cyclically); an expert used at step t is next usable at step t+1, after the accesses of every
other layer. With fewer slots than the distinct experts of one full cycle, LRU always evicts the
oldest, which is exactly the one needed next: a hit rate of 0 whatever the routing (the classic
cyclic-access pathology of LRU). Frequency-based eviction keeps a stable set and hits in
proportion to its share of the accesses.

Run (CPU, ~5 minutes on 2 cores; writes replay.json and replay.md under --out):
    PYTHONPATH=. python benchmarks/offload_policy_replay.py --out benchmarks/results/offload
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import random
import time
from pathlib import Path

import torch

from moeflow.infer.offload.expert_cache import POLICIES, ExpertCache
from moeflow.infer.offload.expert_store import ExpertStore

FRACTIONS = (0.1, 0.2, 0.35, 0.5)
MODEL = dict(name="replay-moe", arch="llama", vocab_size=256, n_layers=8, d_model=64,
             n_heads=4, n_kv_heads=2, d_ff=128, expert_d_ff=64, max_seq_len=64, moe_every=1,
             num_experts=16, router=dict(top_k=2, dropless=True, normalize_topk=True))

Trace = list[list[list[int]]]  # step -> MoE layer -> distinct experts (sorted)


def train_model(steps: int, seed: int = 0):
    """Train the replay model on builtin:interpreter bytes (a byte-level vocabulary: no BPE to
    train first, which on 2 cores takes longer than the model); returns (model, validation
    windows [W, 129] of held-out bytes, validation losses)."""
    from moeflow import ModelConfig, Transformer
    from moeflow.data.corpus import interpreter_documents

    docs, _ = interpreter_documents(max_bytes=4_000_000)
    data = torch.tensor(list("\n".join(d.text for d in docs).encode("utf-8")),
                        dtype=torch.int64)
    split = int(0.95 * data.numel())
    train, val = data[:split], data[split:]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    T, B = MODEL["max_seq_len"], 8
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train.numel() - T - 1, (B,), generator=g)
        batch = torch.stack([train[s:s + T + 1] for s in starts.tolist()])
        out = model(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        (ce + out.router_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"train step {step + 1}/{steps} loss {ce.item():.3f}", flush=True)
            losses.append((step + 1, ce.item()))
    n = (val.numel() - 1) // (T + 1)
    windows = val[:n * (T + 1)].view(n, T + 1)
    model.eval()
    with torch.no_grad():
        out = model(windows[:16, :-1], inference=True)
        val_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1),
                                                     windows[:16, 1:].flatten()).item()
    return model, windows, losses, val_loss


@torch.no_grad()
def trained_routing(model, windows: torch.Tensor) -> torch.Tensor:
    """ids_WTLK: each validation token's experts, per MoE layer."""
    per_layer = []
    out = model(windows[:, :-1], inference=True)
    W, T = windows.shape[0], windows.shape[1] - 1
    for r in out.routing:
        per_layer.append(r.ids_TK.reshape(W, T, -1))
    return torch.stack(per_layer, dim=2)


def uniform_routing(W: int, T: int, L: int, E: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(W, T, L, E, generator=g).argsort(-1)[..., :K]


def trace_of(ids_WTLK: torch.Tensor, batch: int) -> Trace:
    """Decode steps: `batch` windows side by side, each layer's union of their experts."""
    W, T, L, _ = ids_WTLK.shape
    steps: Trace = []
    for w0 in range(0, W - batch + 1, batch):
        block = ids_WTLK[w0:w0 + batch]
        for t in range(T):
            steps.append([sorted(set(block[:, t, layer].reshape(-1).tolist()))
                          for layer in range(L)])
    return steps


def replay_engine_cache(trace: Trace, policy: str, slots: int, E: int) -> float:
    """Hit rate of moeflow's ExpertCache on `trace` (one-element experts on the CPU)."""
    L = len(trace[0])
    store = ExpertStore(pin=False)
    for _ in range(L):
        store.add_layer(torch.zeros(E, 1, 1), torch.zeros(E, 1, 1), None, None)
    cache = ExpertCache(store, store.layers[0], slots, torch.device("cpu"), policy)
    for step in trace:
        for layer, experts in enumerate(step):
            cache.release(cache.acquire(layer, experts))
    return cache.stats().hit_rate


def replay_belady(trace: Trace, slots: int) -> float:
    """Hit rate of Belady's MIN with the engine's pins (the layer's own experts stay)."""
    events = [(layer, experts) for step in trace for layer, experts in enumerate(step)]
    uses: dict[tuple[int, int], list[int]] = {}
    for i, (layer, experts) in enumerate(events):
        for e in experts:
            uses.setdefault((layer, e), []).append(i)

    def next_use(key: tuple[int, int], i: int) -> float:
        lst = uses[key]
        j = bisect.bisect_right(lst, i)
        return lst[j] if j < len(lst) else float("inf")

    resident: set[tuple[int, int]] = set()
    hits = lookups = 0
    for i, (layer, experts) in enumerate(events):
        keys = [(layer, e) for e in experts]
        for key in keys:
            lookups += 1
            if key in resident:
                hits += 1
                continue
            if len(resident) >= slots:
                victim = max((k for k in resident if k not in keys),
                             key=lambda k: next_use(k, i))
                resident.discard(victim)
            resident.add(key)
    return hits / lookups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300, help="training steps of the replay model")
    p.add_argument("--windows", type=int, default=64,
                   help="validation windows replayed (63 tokens each)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    random.seed(0)
    model, windows, train_losses, val_loss = train_model(args.steps)
    train_s = time.perf_counter() - t0
    windows = windows[:args.windows]
    L, E, K = MODEL["n_layers"], MODEL["num_experts"], MODEL["router"]["top_k"]
    routings = {"trained": trained_routing(model, windows),
                "uniform": uniform_routing(windows.shape[0], windows.shape[1] - 1, L, E, K)}
    rows = []
    for source, ids in routings.items():
        for batch in (1, 16):
            trace = trace_of(ids, batch)
            for frac in args.fractions:
                slots = max(int(frac * L * E), E)  # a layer may need all its experts at once
                row = {"routing": source, "batch": batch, "fraction": slots / (L * E),
                       "slots": slots, "steps": len(trace)}
                for policy in POLICIES:
                    row[policy] = replay_engine_cache(trace, policy, slots, E)
                row["belady"] = replay_belady(trace, slots)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": "CPU", "torch": torch.__version__,
              "command": f"PYTHONPATH=. python benchmarks/offload_policy_replay.py --out "
                         f"{args.out} --steps {args.steps} --windows {args.windows}",
              "model": MODEL, "train_steps": args.steps, "train_s": train_s,
              "train_losses": train_losses, "val_loss": val_loss,
              "wall_s": time.perf_counter() - t0, "rows": rows}
    (out / "replay.json").write_text(json.dumps(report, indent=2))
    policies = [*POLICIES, "belady"]
    lines = ["| routing | batch | cache fraction (slots) | " + " | ".join(policies) + " |",
             "|---|---|---|" + "---|" * len(policies)]
    for r in rows:
        lines.append(f"| {r['routing']} | {r['batch']} | {r['fraction']:.2f} ({r['slots']}) | "
                     + " | ".join(f"{r[q]:.3f}" for q in policies) + " |")
    lines += ["", f"Hit rates (share of demand accesses found resident). {report['date']}, "
              f"CPU, {report['torch']}, model trained {args.steps} steps "
              f"(held-out byte loss {val_loss:.3f}) in {train_s:.0f} s; "
              f"`{report['command']}`"]
    (out / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
