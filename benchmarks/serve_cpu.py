"""`moeflow serve` under load on CPU: bench-serve at several concurrencies against the `tiny`
preset (random weights, a BPE tokenizer trained on the Python standard library's sources).

What it shows: how continuous batching turns concurrency into throughput on the server path
(HTTP + validation + engine thread + detokenization + SSE), and what that costs in latency and
time to first token. Random weights: the numbers are about the serving system, not the text.

Writes benchmarks/results/serve_cpu_tiny.json and .md (machine, date, command).

Usage:
  python benchmarks/serve_cpu.py [--concurrency 1 4 16] [--max-tokens 32] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from moeflow import ModelConfig, Transformer  # noqa: E402
from moeflow.data.corpus import stdlib_documents  # noqa: E402
from moeflow.data.tokenizer import BPETokenizer  # noqa: E402
from moeflow.serve.bench import BenchConfig, run_bench  # noqa: E402
from moeflow.train.checkpoint import save_checkpoint  # noqa: E402
from moeflow.train.run_config import TrainConfig  # noqa: E402


def make_checkpoint(out: Path) -> None:
    cfg = ModelConfig.from_name("tiny")
    docs = [d.text for d in stdlib_documents()[:300]]
    tok = BPETokenizer.train(docs, vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(out, 0, model=model, optimizers=[opt],
                    state={}, tokenizer=tok, model_config=cfg, run_config=TrainConfig())


def engine_alone(run: Path, concurrency: int, requests: int, max_tokens: int) -> float:
    """Output tokens/s of the bare engine on the same prompts: the ceiling for the server."""
    from moeflow.infer import Engine, EngineConfig, SamplingParams
    from moeflow.train.checkpoint import load_for_inference, resolve_checkpoint

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as `moeflow serve` on CPU
    model, tok = load_for_inference(resolve_checkpoint(run))
    engine = Engine(model, EngineConfig(max_batch_size=concurrency))
    prompt = tok.encode(BenchConfig().prompt)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    engine.generate([prompt], SamplingParams(max_new_tokens=2, temperature=0))
    start = time.perf_counter()
    out = engine.generate([prompt] * requests, params)
    return sum(map(len, out)) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--port", type=int, default=18471)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/serve_cpu_tiny"))
    args = ap.parse_args()
    load0 = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "tiny"
        make_checkpoint(run)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        server = subprocess.Popen(
            [sys.executable, "-m", "moeflow", "serve", "--model", str(run), "--port",
             str(args.port), "--max-batch", str(args.max_batch), "--max-queue", "1024"],
            env=env)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            run_bench(BenchConfig(url=url, concurrency=2, requests=4, max_tokens=4))  # warm-up
            results = []
            for c in args.concurrency:
                r = run_bench(BenchConfig(url=url, concurrency=c, requests=max(16, 4 * c),
                                          max_tokens=args.max_tokens))
                print(r.table(), flush=True)
                results.append(r.to_dict())
        finally:
            server.terminate()
            code = server.wait(60)
        for r in results:  # with the server stopped, so the two do not share the CPU
            c = r["config"]
            r["engine_alone_tokens_per_s"] = engine_alone(
                run, min(c["concurrency"], args.max_batch), c["requests"], args.max_tokens)
    meta = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, no GPU",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/serve_cpu.py " + " ".join(sys.argv[1:]),
            "model": "tiny preset (4 layers, d 128, residual MoE 4/8 experts top-1, "
                     "vocab 2048), random weights", "max_batch": args.max_batch,
            "torch": torch.__version__, "server_exit_code": code,
            "load_average_1m_before_after": [load0, round(os.getloadavg()[0], 2)]}
    Path(args.out + ".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = ["# moeflow serve on CPU: bench-serve, tiny model", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| concurrency | requests | req/s | output tok/s | latency p50 / p90 / p99 (ms) "
             "| TTFT p50 / p90 / p99 (ms) | engine alone tok/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lat, ttft = r["latency_s"], r["ttft_s"]
        ms = lambda d: " / ".join(f"{d[k] * 1000:.0f}" for k in ("p50", "p90", "p99"))  # noqa
        lines.append(f"| {r['config']['concurrency']} | {r['succeeded']} | "
                     f"{r['requests_per_s']:.1f} | {r['output_tokens_per_s']:.0f} | {ms(lat)} | "
                     f"{ms(ttft)} | {r['engine_alone_tokens_per_s']:.0f} |")
    lines.append(f"\nEach request: a {len(BenchConfig().prompt)}-character prompt, "
                 f"{args.max_tokens} output tokens (ignore_eos), greedy, streamed. Engine alone: "
                 f"the same prompts through Engine.generate in-process, max_batch_size = "
                 f"concurrency, same torch threads as the server (cores - 1), after the server "
                 f"stopped. The bench client runs on the same CPU as the server.")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
