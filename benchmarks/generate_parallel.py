"""Multi-GPU decode and prefill of the engine: tensor slicing × expert parallelism (issue 12).

Run by `benchmarks/generate.py --tp T --ep E` under torchrun (tp × ep processes, one GPU each):
    torchrun --nproc-per-node 2 benchmarks/generate.py --tp 1 --ep 2 --out $OUT
    torchrun --nproc-per-node 4 benchmarks/generate.py --tp 2 --ep 2 --a2a plain --out $OUT
    torchrun --nproc-per-node 1 benchmarks/generate.py --tp 1 --ep 1 --out $OUT   # same path, 1 GPU

Every rank builds its shard of the model (moeflow.parallel.inference) with random bf16 weights
directly on its GPU (no checkpoint: the 52B `1.3b-moe128` would take minutes to write); rank 0
drives the engine (moeflow.infer.engine, eager: the token exchange reads split sizes on the
host, so no CUDA graphs), the others follow. Per model, on rank 0:
  * decode ms/step at batch 1, 16, 64 (prompts of 32 tokens, greedy; wall time of `step()`),
    measured exactly as benchmarks/generate.py measures the one-GPU engine;
  * prefill of 2048 tokens (one `step()` admitting one prompt);
  * time in collectives: the same decode steps with every torch.distributed collective
    bracketed by device synchronisations (so the figure is the collective alone; the
    instrumented step is slower than the plain one and reported beside it);
  * the per-GPU bandwidth floor of a decode step: the bytes rank 0 must read (its dense shard,
    the expected share of its experts the step's tokens select, its KV cache) over the
    measured device copy bandwidth.
Writes parallel-<models>-tp<T>-ep<E>-<a2a>.json and .md under --out.
"""

from __future__ import annotations

import datetime
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from moeflow import ModelConfig
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.ranks import StepChannel
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.model.transformer import init_parameters
from moeflow.parallel.inference import InferenceMesh, InferenceParallel
from moeflow.parallel.launch import init_distributed, shutdown

from generate import engine_prefill, step_ms, sync_time  # the one-GPU script's timing helpers

PROMPT = 32
COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "broadcast")


def build_shard(name: str, mesh: InferenceMesh, device: torch.device, seed: int):
    cfg = ModelConfig.from_name(name).replace(max_seq_len=4096)
    with torch.device("meta"):
        model = mesh.build(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    torch.manual_seed(seed)
    with torch.no_grad():
        init_parameters(model, cfg.init_std, cfg.n_layers)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model.eval()


@contextmanager
def timed_collectives():
    """Seconds spent in each torch.distributed collective inside the block (synchronised)."""
    spent = {k: 0.0 for k in COLLECTIVES}
    originals = {k: getattr(dist, k) for k in COLLECTIVES}

    def wrap(kind):
        def call(*args, **kwargs):
            t0 = sync_time()
            out = originals[kind](*args, **kwargs)
            spent[kind] += sync_time() - t0
            return out
        return call

    for k in COLLECTIVES:
        setattr(dist, k, wrap(k))
    try:
        yield spent
    finally:
        for k, fn in originals.items():
            setattr(dist, k, fn)


def decode(engine: Engine, batch: int, steps: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = [engine.add_request(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(),
                              SamplingParams(max_new_tokens=2 * steps + 16, temperature=0))
           for _ in range(batch)]
    engine.step()
    for _ in range(3):
        engine.step()
    times = step_ms(engine, steps)
    with timed_collectives() as spent:
        inst = step_ms(engine, steps)
    before = engine.stats().expert_counts
    engine.step()
    after = engine.stats().expert_counts
    distinct = [sum(b != a for a, b in zip(x, y)) / len(x) for x, y in zip(before, after)]
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return {"step_ms": statistics.median(times), "step_ms_min": min(times),
            "instrumented_step_ms": statistics.median(inst),
            "collective_ms_per_step": {k: v * 1e3 / steps for k, v in spent.items()},
            "distinct_expert_fraction": statistics.mean(distinct) if distinct else 0.0}


def floor_ms(model, fraction: float, batch: int, copy_GBps: float) -> float:
    """Bytes this rank reads per decode step / copy bandwidth (expected expert share)."""
    total, seen = 0.0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name in ("tok_emb.weight", "pos_emb.weight"):
            total += batch * p.shape[1] * p.element_size()
        elif ".experts." in name:
            total += p.nbytes * min(1.0, fraction)
        else:
            total += p.nbytes
    kv = batch * (PROMPT + 20) * SlotKVCache.bytes_per_token(model)
    return (total + kv) / copy_GBps / 1e6


def copy_bandwidth(device: torch.device) -> float:
    a = torch.empty(1 << 30 if device.type == "cuda" else 1 << 26, dtype=torch.uint8,
                    device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(10):
        t0 = sync_time()
        b.copy_(a)
        times.append(sync_time() - t0)
    return 2 * a.numel() / statistics.median(times) / 1e9


def run(args) -> None:
    par = InferenceParallel(tp=args.tp, ep=args.ep, a2a=args.a2a, timeout_s=600.0)
    # CPU (gloo): a dry run of the script with a small preset, e.g. --models tiny --steps 2.
    env = init_distributed("cuda" if torch.cuda.is_available() else "cpu",
                           timeout_s=par.timeout_s)
    out = Path(args.out)
    tag = f"parallel-tp{args.tp}-ep{args.ep}-{args.a2a}"
    gpu = torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu"
    results = {"gpu": gpu, "world": env.world,
               "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "command": f"torchrun --nproc-per-node {env.world} benchmarks/generate.py "
                          f"--tp {args.tp} --ep {args.ep} --a2a {args.a2a} "
                          f"--models {args.models}",
               "copy_GBps": copy_bandwidth(env.device), "models": {}}
    for name in args.models.split(","):
        mesh = InferenceMesh(ModelConfig.from_name(name), par, env.local_world)
        model = build_shard(name, mesh, env.device, seed=env.rank)
        engine = Engine(model, EngineConfig(max_batch_size=64, max_seq_len=2048 + 64),
                        StepChannel(dist.group.WORLD, 0, env.device))
        if not env.is_main:
            engine.follow()
            del engine, model
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        res = results["models"].setdefault(name, {})
        res["rank0_param_GB"] = sum(p.nbytes for p in model.parameters()) / 1e9
        vocab = model.config.vocab_size
        for batch in (1, 16, 64):
            r = decode(engine, batch, args.steps, vocab)
            r["floor_ms"] = floor_ms(model, r["distinct_expert_fraction"], batch,
                                     results["copy_GBps"])
            res[f"decode_b{batch}"] = r
            print(name, batch, json.dumps(r), flush=True)
        res["prefill_2048"] = engine_prefill(engine, 2048, vocab)
        print(name, "prefill", res["prefill_2048"], flush=True)
        engine.close()
        del engine, model
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{tag}.json").write_text(json.dumps(results, indent=1))
        lines = [f"# {tag} on {env.world}× {results['gpu']} ({results['date']})", "",
                 "| model | batch | step ms | floor ms | collectives ms (instrumented step ms) |",
                 "|---|---|---|---|---|"]
        for name, res in results["models"].items():
            for b in (1, 16, 64):
                r = res[f"decode_b{b}"]
                coll = sum(r["collective_ms_per_step"].values())
                lines.append(f"| {name} | {b} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
                             f"{coll:.2f} ({r['instrumented_step_ms']:.2f}) |")
            lines.append(f"| {name} | prefill 2048 | {res['prefill_2048']['ms']:.1f} | | |")
        (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    shutdown(env)
