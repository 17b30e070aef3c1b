"""Decode of the engine with each decode fast path on and off, in one process, one command.

Issue 14's decode targets (Qwen3-30B-A3B shape: ≤ 2.5 ms/token at batch 1, ≤ 11 ms/step at
batch 16) are set by how many kernels a step launches per layer and how close the expert and
attention kernels stream at the memory bandwidth. Each variant is the same model (random bf16
weights built on the GPU, as benchmarks/generate.py builds them) with some `Backends` fields
forced; per variant:
- decode ms/step at batch 1 and 16 through the engine (CUDA graphs, as served: median of
  `--steps` timed steps, and one graph replay timed alone);
- kernels per decode step and their summed GPU time, from a profile of one eager step at batch 1
  (a replayed graph hides its kernels from the profiler), and the top kernels;
- greedy tokens and the first step's logits against the first variant's (max relative error):
  every variant must decode the same tokens.

    PYTHONPATH=. python benchmarks/decode_study.py --out $OUT
    PYTHONPATH=. python benchmarks/decode_study.py --out $OUT \
        --variant baseline=attention:reference --variant all=
    PYTHONPATH=. python benchmarks/decode_study.py --out $OUT \
        --variant after= --variant fused=router:triton_decode_fused

A variant is `label=field:value,field:value` over Backends' fields; fields the installed
moeflow's Backends does not have are reported as an error for that variant, not a crash.
Writes OUT/decode_study.{json,md,log}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build, engine_decode, profile_kernels  # noqa: E402

from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.ops.backend import Backends  # noqa: E402

DEFAULT_VARIANTS = ("before=attention:reference", "after=")


def parse_variant(spec: str) -> tuple[str, dict]:
    label, _, fields = spec.partition("=")
    forced = dict(f.split(":", 1) for f in fields.split(",") if f)
    return label, forced


def greedy(engine: Engine, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    rows = []
    engine.logits_hook = lambda rid, row: rows.append(row.float().clone())
    out = engine.generate([prompt], SamplingParams(max_new_tokens=new, temperature=0))[0]
    engine.logits_hook = None
    return out, rows[1] if len(rows) > 1 else rows[0]  # rows[0]: the prefill's; [1]: a decode


def run_variant(model, label: str, forced: dict, args, res: dict, log) -> None:
    names = {f.name for f in dataclasses.fields(Backends)}
    unknown = sorted(set(forced) - names)
    if unknown:
        res[label] = {"error": f"Backends has no field {unknown} here", "forced": forced}
        log(f"{label}: skipped, Backends has no field {unknown}")
        return
    model.set_backends(Backends(**forced))
    r: dict = {"forced": forced}
    vocab = model.config.vocab_size
    engine = Engine(model, EngineConfig(max_batch_size=16, max_seq_len=args.max_seq_len))
    for batch in (1, 16):
        r[f"decode_b{batch}"] = engine_decode(engine, batch, args.steps, vocab)
        log(f"{label}: decode b{batch} {r[f'decode_b{batch}']['step_ms']:.3f} ms/step")
    prompt = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(7)).tolist()
    r["tokens"], first = greedy(engine, prompt, args.new_tokens)
    eager = Engine(model, EngineConfig(max_batch_size=1, max_seq_len=args.max_seq_len,
                                       cuda_graphs=False, prefill_graphs=False))
    rid = eager.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=0))
    eager.step()  # prefill
    eager.step()  # one warm decode step (compiles, autotunes)
    r["eager_step_profile"] = profile_kernels(eager.step, top=args.top)
    eager.abort(rid)
    log(f"{label}: eager decode step {r['eager_step_profile']['kernels']} kernels, "
        f"{r['eager_step_profile']['total_us']:.0f} us of kernel time")
    r["first_logits"] = first
    res[label] = r
    del engine, eager
    gc.collect()
    torch.cuda.empty_cache()


def markdown(results: dict) -> str:
    lines = [f"# Decode study — {results['gpu']}, {results['date']}", "",
             f"Model {results['model']}, torch {results['torch']}; command "
             f"`{results['command']}`.", "",
             "| variant | forced | decode b1 ms | b1 graph replay ms | decode b16 ms | kernels "
             "per eager b1 step | their GPU time us | tokens = first variant | decode logits vs "
             "first variant (relative L2) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results["variants"].items():
        if "error" in r:
            lines.append(f"| {label} | {r['forced']} | {r['error']} |")
            continue
        b1, b16, p = r["decode_b1"], r["decode_b16"], r["eager_step_profile"]
        lines.append(f"| {label} | {r['forced']} | {b1['step_ms']:.3f} | "
                     f"{b1.get('graph_replay_ms', float('nan')):.3f} | {b16['step_ms']:.3f} | "
                     f"{p['kernels']} | {p['total_us']:.0f} | {r.get('same_tokens')} | "
                     f"{r.get('rel_err', float('nan')):.2e} |")
    for label, r in results["variants"].items():
        if "eager_step_profile" in r:
            lines += ["", f"Top kernels of one eager b1 step, {label}:", ""]
            lines += [f"- {k} ×{c}: {t} us" for k, c, t in r["eager_step_profile"]["top"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--variant", action="append", help="label=field:value,... (repeatable)")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per batch size")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=30, help="kernels listed per eager step profile")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        lines.append(line)

    results = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "model": args.model,
               "command": " ".join(["python"] + sys.argv), "variants": {}}
    model = build(args.model)
    first = None
    for spec in args.variant or DEFAULT_VARIANTS:
        label, forced = parse_variant(spec)
        try:
            run_variant(model, label, forced, args, results["variants"], log)
        except Exception as err:  # noqa: BLE001 - one failed variant is a result, not the end
            results["variants"][label] = {"forced": forced,
                                          "error": f"{type(err).__name__}: {err}"[:300]}
            log(traceback.format_exc())
        r = results["variants"][label]
        if "first_logits" in r:
            logits = r.pop("first_logits")
            if first is None:
                first = (r["tokens"], logits)
            r["same_tokens"] = r["tokens"] == first[0]
            r["rel_err"] = float(((logits - first[1]).norm() / first[1].norm()).item())
        (out / "decode_study.json").write_text(json.dumps(results, indent=1))
        (out / "decode_study.md").write_text(markdown(results))
        (out / "decode_study.log").write_text("\n".join(lines) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
