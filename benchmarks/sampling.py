"""The sampler alone: moeflow's batched draw against the per-row chain it replaced and
transformers' sampling, on the same logits (a decode step's [B, V] bf16 row block).

Implementations, per (batch, parameters):
- `moeflow`: moeflow.infer.sampling.sample_tokens (on CUDA a top-k launch, or a top-p's
  nucleus bounded without a sort, then one Triton draw; a top-k or sort and the plain-torch
  draw elsewhere), every row with its own seed;
- `per-row`: the chain moeflow ran until session 39, one row at a time with the request's own
  torch.Generator (kept here, as it was, as the baseline);
- `transformers`: its logits processors (temperature, top-k, top-p warpers) over the batch, a
  softmax and torch.multinomial with one generator for all rows (no per-request seed).

Timing: `calls` back-to-back calls, the device synchronised only before the first and after the
last (the served loop launches the sampler after the decode graph without waiting, so what
counts is the slower of the host's launches and the device's kernels), median µs per call over
`rounds` rounds.

    PYTHONPATH=. python benchmarks/sampling.py --out DIR [--batches 1 16] [--vocab 151936]
        [--calls 50] [--rounds 5]

Writes DIR/sampling.{json,md}. With --engine LABEL instead: the engine alone on the `tiny`
preset (random weights, vocabulary 2048; on a GPU in bf16, its decode steps replayed from CUDA
graphs), 16 prompts of 40 tokens generating 64 each at batch 16, greedy and sampled, output
tokens/s (best of three generate() calls), appended to DIR/engine_sampled.md under LABEL; runs
in trees from session 38 on, for an A/B of two trees (PYTHONPATH=OTHER_TREE python
benchmarks/sampling.py --out DIR --engine base).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH's tree
from benchmarks.machine import cpu_name  # noqa: E402
from moeflow.infer.sampling import SamplingParams  # noqa: E402

CASES = {  # name -> (temperature, top_k, top_p)
    "temperature 0.8": (0.8, 0, 1.0),
    "temperature 0.8, top-k 40, top-p 0.95": (0.8, 40, 0.95),
    "temperature 0.8, top-p 0.95": (0.8, 0, 0.95),
}


def per_row_chain(logits_1V: torch.Tensor, p: SamplingParams,
                  generator: torch.Generator) -> torch.Tensor:
    """moeflow's sampler for one row before session 39 (moeflow/infer/sampling.py, sample_next)."""
    logits = logits_1V.float()
    temperature = max(p.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def implementations(logits_BV: torch.Tensor, p: SamplingParams) -> dict:
    from moeflow.infer.sampling import sample_tokens

    B = logits_BV.shape[0]
    device = logits_BV.device
    params, seeds = [p] * B, list(range(B))
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(B)]
    position = [100]

    def moeflow():
        position[0] += 1
        return sample_tokens(logits_BV, params, seeds, [position[0]] * B)

    def per_row():
        out = torch.empty(B, dtype=torch.int64, device=device)
        for i in range(B):
            out[i] = per_row_chain(logits_BV[i:i + 1], p, generators[i])[0]
        return out

    impls = {"moeflow": moeflow, "per-row": per_row}
    try:
        from transformers.generation.logits_process import (LogitsProcessorList,
                                                            TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)
    except ImportError:
        return impls
    warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    shared = torch.Generator(device=device).manual_seed(0)
    ids = torch.zeros(B, 1, dtype=torch.int64, device=device)

    def transformers():
        scores = warpers(ids, logits_BV.float())
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=shared).squeeze(-1)

    impls["transformers"] = transformers
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_us(fn, device: torch.device, calls: int, rounds: int) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        out.append(round((time.perf_counter() - t0) * 1e6 / calls, 1))
    return out


ENGINE_CASES = {"greedy": dict(temperature=0),
                "temperature 0.8, top-k 40, top-p 0.95": dict(temperature=0.8, top_k=40,
                                                              top_p=0.95, seed=1),
                "temperature 1.0": dict(temperature=1.0, seed=1),
                "temperature 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95, seed=1)}


def engine_tokens_per_s(label: str, out: Path) -> None:
    from moeflow import ModelConfig, Transformer
    from moeflow.infer import Engine, EngineConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).eval()
    if torch.cuda.is_available():  # served as a GPU serves it: bf16, its steps from CUDA graphs
        model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2048, (40,), generator=g).tolist() for _ in range(16)]
    cells = []
    for kw in ENGINE_CASES.values():
        engine = Engine(model, EngineConfig(max_batch_size=16))
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, **kw))  # warm-up
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            got = engine.generate(prompts, SamplingParams(max_new_tokens=64, **kw))
            best = max(best, sum(map(len, got)) / (time.perf_counter() - t0))
        cells.append(f"{best:.0f}")
    path = out / "engine_sampled.md"
    out.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Engine alone, sampled against greedy (tiny preset, batch 16)\n\n"
                        "Output tokens/s, best of three generate() calls of 16 x 64 tokens; "
                        "one row per run.\n\n| label | machine, threads, date | "
                        + " | ".join(ENGINE_CASES) + " |\n|---|---|"
                        + "---:|" * len(ENGINE_CASES) + "\n")
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    row = f"| {label} | {where}, {torch.get_num_threads()}, {when} | " + " | ".join(cells) + " |"
    with path.open("a") as f:
        f.write(row + "\n")
    print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", metavar="LABEL",
                    help="time the engine alone (tiny preset) instead, as LABEL's row")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine:
        return engine_tokens_per_s(args.engine, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
           "vocab": args.vocab, "calls": args.calls, "rounds": args.rounds, "rows": []}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B in args.batches:
            logits = (torch.randn(B, args.vocab, generator=g) * 3).bfloat16().to(device)
            for case, (t, k, p) in CASES.items():
                params = SamplingParams(temperature=t, top_k=k, top_p=p)
                for name, fn in implementations(logits, params).items():
                    us = time_us(fn, device, args.calls, args.rounds)
                    row = {"batch": B, "case": case, "impl": name, "us": us,
                           "median_us": statistics.median(us)}
                    res["rows"].append(row)
                    print(f"b{B} {case} {name}: {row['median_us']} µs/call {us}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling.json").write_text(json.dumps(res, indent=1))
    (args.out / "sampling.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in res["rows"]))
    lines = [f"# Sampler alone — {res['device']}, {res['date']}", "",
             f"`{res['command']}`; torch {res['torch']}, {res['threads']} threads, vocabulary "
             f"{res['vocab']}, bf16 logits; µs per call, median of {res['rounds']} rounds of "
             f"{res['calls']} back-to-back calls.", "",
             "| batch | parameters | " + " | ".join(impls) + " |",
             "|---:|---|" + "---:|" * len(impls)]
    cells: dict[tuple, dict] = {}
    for r in res["rows"]:
        cells.setdefault((r["batch"], r["case"]), {})[r["impl"]] = r["median_us"]
    for (B, case), by in cells.items():
        lines.append(f"| {B} | {case} | " + " | ".join(
            f"{by[i]:.1f}" if i in by else "—" for i in impls) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
