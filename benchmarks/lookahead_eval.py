"""Read-ME lookahead routing against pre-gating, in the offloaded engine on the CPU.

What a lookahead router (moeflow.model.lookahead, `moeflow train --lookahead`) buys and costs:
  * quality: the validation LM loss of the original model, of the lookahead model (routed by
    its lookahead router) and of a control fine-tuned for as many steps without it, read from
    the runs' metrics.jsonl (the trainer's validation, the same held-out windows when the runs
    share --batch-size, --val-batches and the corpus);
  * prefetch: per method (original model: none, zero-shot `router`, `pregate` heads; lookahead
    model: none, `lookahead`), over decode forwards only (`DecodeCounts`): the prefetch
    recall and precision, the expert cache's hit rate and the copies and bytes copied per
    decoded token, at batch 1 and at `--batch`, and the CPU's tokens/s (the simulated device
    copies synchronously, on a busy shared CPU: it says nothing about transfer time;
    benchmarks/offload.py measures that on a GPU, `--configs cyclic/lookahead`);
  * expert-aware admission vs FIFO (moeflow.infer.scheduler) with the lookahead model at
    `--batch`: a queue of `--queue` requests of varied lengths, so slots free at different
    times; distinct experts per MoE layer per decode step (the copies a step can need), hit
    rate, bytes per token, and how long requests waited.
The CPU runs the same cache, prefetch and statistics code as CUDA (streams are no-ops); the hit
rate depends on the routing, not on the device. Decoding is sampled (T = 1, seeded): a small
model's greedy continuations repeat themselves, which flatters every predictor.

Run (CPU, a few minutes on 2 cores):
    PYTHONPATH=. python benchmarks/lookahead_eval.py --base /tmp/h2/pg128 \
        --lookahead /tmp/h3/la --control /tmp/h3/ctrl --out benchmarks/results/offload
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from moeflow.data.corpus import load_corpus, split_documents
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.placement import plan_offload
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.model.moe import MoELayer
from moeflow.train.checkpoint import load_for_inference, load_run_config, resolve_checkpoint


def held_out_ids(ckpt: Path, tokenizer) -> list[int]:
    """The run's validation documents, tokenized (the split its trainer validated on)."""
    run = load_run_config(ckpt)
    _, val_docs = split_documents(load_corpus(run.data, run.text_field), run.val_fraction)
    return tokenizer.encode_documents([d.text for d in val_docs]).tolist()


def windows(ids: list[int], count: int, length: int, offset: int = 0) -> list[list[int]]:
    stride = max(length, len(ids) // count)
    out = [ids[i + offset:i + offset + length] for i in range(0, stride * count, stride)]
    return [w for w in out if len(w) == length][:count]


def budget(model, slots: int, batch: int, max_len: int) -> str:
    kv = SlotKVCache.bytes_per_token(model) * batch * max_len
    probe = plan_offload(model, OffloadConfig(gpu_memory="1TiB"), kv, max_len, batch)
    return str(probe.fixed + slots * probe.expert)


class DecodeCounts:
    """Cache and prefetch counts of decode forwards only (inputs [B, 1]); prefills need nearly
    every expert of a layer and would lift every figure. Whatever happens between two forwards
    (the lookahead prefetch, issued before its decode forward) counts with the next one."""

    KEYS = ("lookups", "hits", "copies", "bytes_copied")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.decode = dict.fromkeys(self.KEYS + ("predicted", "needed", "correct"), 0)
        self.distinct = self.layer_steps = 0
        self.last = self.snapshot()
        self.handles = [engine.model.register_forward_hook(self.forward_done)] + [
            m.register_forward_hook(self.layer_done) for m in engine.model.modules()
            if isinstance(m, MoELayer)]

    def snapshot(self) -> dict:
        s = self.engine.stats().offload
        return {**{k: getattr(s.cache, k) for k in self.KEYS}, "predicted": s.prefetch.predicted,
                "needed": s.prefetch.needed, "correct": s.prefetch.correct}

    def forward_done(self, module, args, out) -> None:
        now = self.snapshot()
        if args[0].shape[1] == 1:
            for k in self.decode:
                self.decode[k] += now[k] - self.last[k]
        self.last = now

    def layer_done(self, module, args, out) -> None:
        if args[0].shape[1] == 1:
            self.distinct += out[1].ids_TK.unique().numel()
            self.layer_steps += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def drive(model, prompts: list[list[int]], lengths: list[int], batch: int, slots: int,
          prefetch: str, batching: str = "fifo") -> dict:
    """Decode every prompt (its own max_new_tokens, sampled) through an offloaded engine."""
    max_len = max(len(p) + n for p, n in zip(prompts, lengths))
    engine = Engine(copy.deepcopy(model), EngineConfig(
        max_batch_size=batch, max_seq_len=max_len, batching=batching,
        offload=OffloadConfig(gpu_memory=budget(model, slots, batch, max_len), device="cpu",
                              prefetch=prefetch)))
    counts = DecodeCounts(engine)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=1.0, seed=i),
                           request_id=f"r{i}")
    started, step = {}, 0
    t0 = time.perf_counter()
    while engine.has_work():
        waiting = {r.request_id for r in engine.scheduler.waiting}
        for event in engine.step():
            if event.request_id in waiting and event.request_id not in started:
                started[event.request_id] = step
        step += 1
    wall = time.perf_counter() - t0
    counts.close()
    d = counts.decode
    decode_tokens = sum(lengths) - len(lengths)  # each request's first token is its prefill's
    return {"prefetch": prefetch, "batch": batch, "slots": slots, "batching": batching,
            "decode_recall": d["correct"] / d["needed"] if d["needed"] else None,
            "decode_precision": d["correct"] / d["predicted"] if d["predicted"] else None,
            "decode_hit_rate": d["hits"] / d["lookups"],
            "decode_copies_per_token": d["copies"] / decode_tokens,
            "decode_bytes_per_token": d["bytes_copied"] / decode_tokens,
            "distinct_per_layer_step": counts.distinct / max(counts.layer_steps, 1),
            "steps": step, "mean_wait_steps": sum(started.values()) / len(started),
            "max_wait_steps": max(started.values()),
            "cpu_tokens_per_s": sum(lengths) / wall}


def measure(model, prefetch: str, prompts, new_tokens: int, batch: int, slots: int) -> dict:
    return drive(model, prompts, [new_tokens] * len(prompts), batch, slots, prefetch)


def batching_compare(model, prompts, batch: int, slots: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 48, (len(prompts),), generator=g).tolist()
    return [{"queue": len(prompts), **drive(model, prompts, lengths, batch, slots, prefetch,
                                            batching)}
            for prefetch in ("none", "lookahead") for batching in ("fifo", "expert-aware")]


def last_validation(run: str | None) -> dict | None:
    if run is None:
        return None
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    keep = ("step", "val_loss", "val_loss_own_routers", "val_lookahead_agreement")
    return {"first": {k: val[0][k] for k in keep if k in val[0]},
            "last": {k: val[-1][k] for k in keep if k in val[-1]},
            "all": [{k: r[k] for k in keep if k in r} for r in val]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the original run (with pre-gate heads for "
                                                  "the pregate rows, e.g. a --pregate run)")
    ap.add_argument("--lookahead", required=True, help="a `moeflow train --lookahead` run")
    ap.add_argument("--control", default=None, help="the original fine-tuned as many steps "
                                                    "without a lookahead router")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=40)
    ap.add_argument("--queue", type=int, default=48, help="requests in the batching comparison")
    ap.add_argument("--out", default="benchmarks/results/offload")
    args = ap.parse_args()
    torch.manual_seed(0)
    base_ckpt, la_ckpt = resolve_checkpoint(args.base), resolve_checkpoint(args.lookahead)
    base, tokenizer = load_for_inference(base_ckpt)
    la, _ = load_for_inference(la_ckpt)
    ids = held_out_ids(la_ckpt, tokenizer)
    prompts = windows(ids, args.prompts, args.prompt_len)
    methods = [("original", base, p) for p in ("none", "router")] + (
        [("original", base, "pregate")] if base.pregate is not None else []) + [
        ("lookahead", la, p) for p in ("none", "lookahead")]
    rows = []
    for b in (1, args.batch):
        for name, model, prefetch in methods:
            rows.append({"model": name, **measure(model, prefetch, prompts, args.new_tokens, b,
                                                  args.slots)})
            print(rows[-1], flush=True)
    queue = windows(ids, args.queue, args.prompt_len // 2, offset=args.prompt_len)
    batching = batching_compare(la, queue, args.batch, args.slots, seed=1)
    for r in batching:
        print(r, flush=True)
    result = {"date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "args": vars(args),
              "total_experts": sum(m.spec.num_experts for m in la.moe_layers()),
              "quality": {"original": last_validation(args.base),
                          "lookahead": last_validation(args.lookahead),
                          "control": last_validation(args.control)},
              "engine": rows, "batching": batching}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookahead.json").write_text(json.dumps(result, indent=1) + "\n")

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    print("| model | prefetch | batch | decode recall | precision | hit rate | KB copied/token "
          "| distinct experts/layer/step | CPU tok/s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['prefetch']} | {r['batch']} | {fmt(r['decode_recall'])} | "
              f"{fmt(r['decode_precision'])} | {r['decode_hit_rate']:.3f} | "
              f"{r['decode_bytes_per_token'] / 1024:.1f} | {r['distinct_per_layer_step']:.2f} | "
              f"{r['cpu_tokens_per_s']:.1f} |")
    print("| batching | prefetch | distinct experts/layer/step | hit rate | KB/token | steps | "
          "mean / max wait (steps) |\n|---|---|---|---|---|---|---|")
    for r in batching:
        print(f"| {r['batching']} | {r['prefetch']} | {r['distinct_per_layer_step']:.2f} | "
              f"{r['decode_hit_rate']:.3f} | {r['decode_bytes_per_token'] / 1024:.1f} | "
              f"{r['steps']} | "
              f"{r['mean_wait_steps']:.1f} / {r['max_wait_steps']} |")


if __name__ == "__main__":
    main()
