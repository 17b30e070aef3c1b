"""Prefetch hit rates of zero-shot pre-gating vs fine-tuned pre-gate heads, in the offloaded
engine on the CPU (the simulated device: the cache, prefetch and their statistics run the same
code as on CUDA; the hit rate depends on the routing, not on the device).

Input: a `moeflow train --pregate` run (its checkpoint holds the backbone and the heads). Prompts
are held-out text: windows of the run's validation documents (the same split the trainer
validated on), decoded through the engine under a budget of `--slots` expert slots: greedily by
default, or sampled (`--temperature`, seeded): a small model's greedy continuations repeat
themselves, which makes the next layers' routing easier to predict than on real text.
Per prefetch method ("router": zero-shot, "pregate": the heads; "none" for the cache alone):
the prefetch recall (share of the experts each MoE layer needed that had been predicted), its
precision, and the expert cache's hit rate, at batch 1 and at batch `--batch`.

Run (CPU, a minute on 2 cores):
    PYTHONPATH=. python benchmarks/pregate_hit_rate.py --run runs/pregate \
        --out benchmarks/results/offload
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from pathlib import Path

import torch

from moeflow.data.corpus import load_corpus, split_documents
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.placement import plan_offload
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.train.checkpoint import load_for_inference, load_run_config, resolve_checkpoint


def prompts_from_run(ckpt: Path, tokenizer, count: int, length: int) -> list[list[int]]:
    run = load_run_config(ckpt)
    _, val_docs = split_documents(load_corpus(run.data, run.text_field), run.val_fraction)
    ids = tokenizer.encode_documents([d.text for d in val_docs]).tolist()
    stride = max(length, len(ids) // count)
    return [ids[i:i + length] for i in range(0, stride * count, stride)][:count]


def measure(ckpt: Path, prefetch: str, prompts: list[list[int]], batch: int, slots: int,
            new_tokens: int, temperature: float) -> dict:
    model, _ = load_for_inference(ckpt)
    max_len = len(prompts[0]) + new_tokens
    kv = SlotKVCache.bytes_per_token(model) * batch * max_len
    probe = plan_offload(model, OffloadConfig(gpu_memory="1TiB"), kv, max_len, batch)
    offload = OffloadConfig(gpu_memory=str(probe.fixed + slots * probe.expert), device="cpu",
                            prefetch=prefetch)

    def run(tokens: int):
        engine = Engine(copy.deepcopy(model), EngineConfig(
            max_batch_size=batch, max_seq_len=max_len, offload=offload))
        engine.generate(prompts, SamplingParams(max_new_tokens=tokens, temperature=temperature,
                                                seed=0 if temperature else None))
        return engine.stats().offload

    s = run(new_tokens)
    # The prompts' prefills alone (one new token: no decode step): a prefill needs the union of
    # its tokens' experts, nearly all of a layer's, so its recall is near 1 and would lift the
    # figure above what decoding sees.
    p = run(1).prefetch
    decode_needed = s.prefetch.needed - p.needed
    return {"prefetch": prefetch, "batch": batch, "slots": slots,
            "total_experts": sum(m.spec.num_experts for m in model.moe_layers()),
            "prefetch_recall": s.prefetch.recall if prefetch != "none" else None,
            "prefetch_precision": s.prefetch.precision if prefetch != "none" else None,
            "decode_recall": ((s.prefetch.correct - p.correct) / decode_needed
                              if prefetch != "none" and decode_needed else None),
            "cache_hit_rate": s.cache.hit_rate, "lookups": s.cache.lookups,
            "copies": s.cache.copies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `moeflow train --pregate` run or checkpoint")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=6, help="expert cache slots (tiny has 12 experts)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--out", default="benchmarks/results/offload")
    ap.add_argument("--tag", default="", help="results go to pregate[_TAG].json")
    args = ap.parse_args()
    torch.manual_seed(0)
    ckpt = resolve_checkpoint(args.run)
    _, tokenizer = load_for_inference(ckpt)
    prompts = prompts_from_run(ckpt, tokenizer, args.prompts, args.prompt_len)
    rows = [measure(ckpt, p, prompts, b, args.slots, args.new_tokens, args.temperature)
            for b in (1, args.batch) for p in ("none", "router", "pregate")]
    run_metrics = ckpt.parent.parent / "metrics.jsonl"  # RUN/checkpoints/step_N
    metrics = ([json.loads(line) for line in run_metrics.read_text().splitlines()]
               if run_metrics.is_file() else [])
    val = [m for m in metrics if "val_pregate_recall" in m]
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
              platform.machine(), "checkpoint": str(ckpt), "args": vars(args), "engine": rows,
              "trainer_validation": [{k: m[k] for k in ("step", "val_pregate_recall",
                                                         "val_zero_shot_recall")} for m in val]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"pregate_{args.tag}.json" if args.tag else "pregate.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| batch | prefetch | recall | decode steps' recall | precision | cache hit rate | "
             "copies |", "|---|---|---|---|---|---|---|"]
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['batch']} | {r['prefetch']} | {fmt(r['prefetch_recall'])} | "
                     f"{fmt(r['decode_recall'])} | "
                     f"{fmt(r['prefetch_precision'])} | {r['cache_hit_rate']:.3f} | "
                     f"{r['copies']} |")
    print("\n".join(lines))
    for m in result["trainer_validation"]:
        print(f"trainer validation step {m['step']}: pre-gate recall "
              f"{m['val_pregate_recall']:.3f}, zero-shot {m['val_zero_shot_recall']:.3f}")


if __name__ == "__main__":
    main()
