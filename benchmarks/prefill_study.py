"""Prefill (and decode) of the engine with each prefill speed-up on and off, one command.

Options compared (issue 14, prefill to the roofline), on the Qwen3-30B-A3B shape (random bf16
weights built on the GPU, as benchmarks/generate.py builds them):
- `elementwise`: Backends.elementwise "auto" (one-pass Triton RMSNorm, add + RMSNorm and q/k norm
  + RoPE on inputs above FUSE_MAX_ELEMENTS) vs "reference" (plain torch at that size);
- `prefill_graphs`: EngineConfig.prefill_graphs (a CUDA graph per prompt-length bucket) on/off;
and, with `--experts auto,tiled` (Backends.experts names), each chosen variant once per expert
path (labelled `variant+experts` for all but "auto").

Per variant: prefill of 2048 tokens (wall time of one `Engine.step()` admitting one prompt,
median of 4 after the first, which captures), decode ms/step at batch 1 and 16 (as
benchmarks/generate.py measures them), the memory the first prefill added (the graph pool),
and the first token's logits against the baseline's (relative error, argmax). For the baseline
and the all-on variant also a kernel profile of one 2048-token prefill step: kernel count, kernel
time vs wall time, the top kernels.

    PYTHONPATH=. python benchmarks/prefill_study.py --out $OUT          # one H200: ~3-5 min
    PYTHONPATH=. python benchmarks/prefill_study.py --smoke --out /tmp/s  # CPU, tiny model

writes OUT/prefill_study.{json,md,log}. --smoke runs the same code on a tiny model on the CPU
(where neither option applies: it only shows the script runs).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build, engine_decode, sync_time  # noqa: E402
from benchmarks.machine import autotuned_configs  # noqa: E402

from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.ops.backend import EXPERT_BACKENDS, Backends  # noqa: E402

# (label, Backends.elementwise, EngineConfig.prefill_graphs); the first is today's engine.
VARIANTS = [("baseline", "reference", False), ("elementwise", "auto", False),
            ("prefill_graphs", "reference", True), ("both", "auto", True)]
PROFILED = ("baseline", "both")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=256, n_layers=2, d_model=64, n_heads=4,
                      n_kv_heads=2, head_dim=16, max_seq_len=256, qk_norm=True, moe_kind="moe",
                      moe_every=1, num_experts=8, expert_d_ff=32,
                      router=RouterConfig(top_k=2, dropless=True, normalize_topk=True))
    return Transformer(cfg).eval()


def prefill(engine: Engine, prompt: list[int], reps: int) -> dict:
    times, first = [], None
    for _ in range(reps):
        seen = []
        engine.logits_hook = lambda rid, row: seen.append(row.float().clone())
        engine.add_request(prompt, SamplingParams(max_new_tokens=1, temperature=0))
        t0 = sync_time()
        engine.step()
        times.append((sync_time() - t0) * 1e3)
        first = seen[0] if first is None else first
    engine.logits_hook = None
    return {"ms": statistics.median(times[1:]), "ms_min": min(times[1:]),
            "first_ms": times[0]}, first


def profile_step(engine: Engine, prompt: list[int], top: int = 15) -> dict:
    """Kernels of one prefill step (graph replays included): count, time, the top by time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    engine.add_request(prompt, SamplingParams(max_new_tokens=1, temperature=0))
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = sync_time()
        engine.step()
        wall_ms = (sync_time() - t0) * 1e3
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0.0) if cuda else e.self_cpu_time_total
        if t > 0:
            rows.append((e.key, e.count, t))
    rows.sort(key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "kernel_ms": sum(r[2] for r in rows) / 1e3,
            "wall_ms_under_profiler": wall_ms,
            "top": [[k[:100], c, round(t, 1)] for k, c, t in rows[:top]]}


def run_variant(model, label, elementwise, graphs, experts, args, prompt, res, log,
                ref_logits):
    model.set_backends(Backends(elementwise=elementwise, experts=experts))
    profiled = label in PROFILED
    label = label if experts == "auto" else f"{label}+{experts}"
    r = res.setdefault(label, {"elementwise": elementwise, "prefill_graphs": graphs,
                               "experts": experts})
    engine = Engine(model, EngineConfig(max_batch_size=16, max_seq_len=args.max_seq_len,
                                        prefill_graphs=graphs))
    cuda = torch.cuda.is_available()
    try:
        before = torch.cuda.memory_reserved() if cuda else 0
        r["prefill"], logits = prefill(engine, prompt, args.reps)
        if cuda:
            r["prefill"]["reserved_added_GB"] = (torch.cuda.memory_reserved() - before) / 1e9
        pf = engine._prefiller
        r["prefill"]["graph_buckets"] = sorted(pf.graphs) if pf is not None else []
        if ref_logits is not None:
            err = float((logits - ref_logits).norm() / ref_logits.norm())
            r["prefill"]["rel_err_vs_baseline"] = err
            r["prefill"]["argmax_equal"] = int(logits.argmax()) == int(ref_logits.argmax())
        log(f"  {label} prefill {r['prefill']}")
        if profiled:
            r["profile"] = profile_step(engine, prompt)
            p = r["profile"]
            log(f"  {label} profile: {p['kernels']} kernels, {p['kernel_ms']:.2f} ms kernel "
                f"time, {p['wall_ms_under_profiler']:.2f} ms wall under the profiler")
            for row in p["top"]:
                log(f"    {row}")
        for batch in (1, 16):
            d = engine_decode(engine, batch, args.steps, model.config.vocab_size)
            r[f"decode_b{batch}"] = {k: d[k] for k in ("step_ms", "step_ms_min", "run_ms",
                                                       "graph_replay_ms") if k in d}
            log(f"  {label} decode b{batch} {r[f'decode_b{batch}']}")
        if cuda:
            from moeflow.ops import grouped_mlp_triton, skinny_linear_triton, tiled_mlp_triton
            r["autotuned"] = autotuned_configs(grouped_mlp_triton, tiled_mlp_triton,
                                               skinny_linear_triton)
            log(f"  {label} autotuned {r['autotuned']}")
        return logits
    except Exception:
        r["error"] = traceback.format_exc()[-3000:]
        log(r["error"])
        return None
    finally:
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def markdown(results: dict) -> str:
    lines = [f"# Prefill study ({results['device']}, {results['date']})", "",
             f"Command: `{results['command']}`", "",
             f"Model: {results['model']}, prefill of {results['prefill_tokens']} tokens.", "",
             "| variant | elementwise | prefill graphs | experts | prefill ms | "
             "first (capture) ms | graph pool GB | rel err vs baseline | decode b1 ms | "
             "decode b16 ms |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v)

    for label, r in results["variants"].items():
        p = r.get("prefill", {})
        lines.append(
            f"| {label} | {r['elementwise']} | {r['prefill_graphs']} | "
            f"{r.get('experts', 'auto')} | {f(p.get('ms'))} | "
            f"{f(p.get('first_ms'))} | {f(p.get('reserved_added_GB'))} | "
            f"{f(p.get('rel_err_vs_baseline'), '{:.2e}')} | "
            f"{f(r.get('decode_b1', {}).get('step_ms'), '{:.3f}')} | "
            f"{f(r.get('decode_b16', {}).get('step_ms'), '{:.3f}')} |")
    for label, r in results["variants"].items():
        if "profile" in r:
            p = r["profile"]
            lines += ["", f"## Profile of one prefill step: {label}", "",
                      f"{p['kernels']} kernels, {p['kernel_ms']:.2f} ms kernel time, "
                      f"{p['wall_ms_under_profiler']:.2f} ms wall under the profiler.", "",
                      "| kernel | count | µs |", "|---|---|---|"]
            lines += [f"| `{k}` | {c} | {t} |" for k, c, t in p["top"]]
        if r.get("autotuned"):
            lines += ["", f"Autotuned ({label}): " + "; ".join(
                f"`{kernel}` {key}: {cfg}" for kernel, picks in r["autotuned"].items()
                for key, cfg in picks.items())]
        if "error" in r:
            lines += ["", f"{label}: error (see JSON)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per batch size")
    ap.add_argument("--reps", type=int, default=5, help="prefills per variant (first captures)")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="comma-separated subset of " + ", ".join(v[0] for v in VARIANTS)
                    + " (the first one run is the reference of the others' logits)")
    ap.add_argument("--experts", default="auto",
                    help="comma-separated Backends.experts choices, each run per variant")
    args = ap.parse_args()
    chosen = args.variants.split(",")
    unknown = sorted(set(chosen) - {v[0] for v in VARIANTS})
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}")
    bad = sorted(set(args.experts.split(",")) - set(EXPERT_BACKENDS) - {"auto"})
    if bad:
        ap.error(f"--experts: unknown {', '.join(bad)}; choose from auto, "
                 + ", ".join(EXPERT_BACKENDS))
    if args.smoke:
        args.model, args.tokens, args.steps, args.reps, args.max_seq_len = "tiny", 40, 3, 3, 128
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "prefill_study.log", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    cuda = torch.cuda.is_available() and not args.smoke
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "command": "python benchmarks/prefill_study.py " + " ".join(sys.argv[1:]),
               "model": args.model, "prefill_tokens": args.tokens, "variants": {}}
    t0 = time.perf_counter()
    model = tiny_model() if args.smoke else build(args.model)
    results["build_s"] = time.perf_counter() - t0
    log(f"built {args.model} in {results['build_s']:.1f} s")
    g = torch.Generator().manual_seed(args.tokens)
    prompt = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=g).tolist()
    ref = None
    runs = [(v, experts) for v in VARIANTS if v[0] in chosen
            for experts in args.experts.split(",")]
    for (label, elementwise, graphs), experts in runs:
        logits = run_variant(model, label, elementwise, graphs, experts, args, prompt,
                             results["variants"], log, ref)
        ref = logits if ref is None else ref
        (out / "prefill_study.json").write_text(json.dumps(results, indent=1))
        (out / "prefill_study.md").write_text(markdown(results))
    results["wall_s"] = time.perf_counter() - t0
    (out / "prefill_study.json").write_text(json.dumps(results, indent=1))
    (out / "prefill_study.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
