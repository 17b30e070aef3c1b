"""Decode and prefill speed of the moeflow engine against transformers and the bandwidth floor.

Models, random bf16 weights built directly on the GPU:
- qwen3-30b-a3b (the issue's shape: 48 layers, d 2048, 128 experts top-8 of width 768, 32 query /
  4 KV heads of 128, vocab 151936; ~61 GB);
- 350m-moe128 (DeepSpeed-MoE paper: GPT 350M + 128 top-1 experts every other layer, 13B; the
  paper's 1.3b-moe128 needs 104 GB in bf16 and does not fit one 80 GB GPU).

Per model: engine decode ms/token at batch 1 and ms/step at batch 16 (prompts of 32 tokens,
greedy; wall time of `Engine.step()`, host work and sampling included) and the device time of one
replayed decode graph; prefill of 2048 tokens (one `step()` admitting one prompt). The engine
runs with fused small ops (Backends(fuse="auto"), the default) and without (fuse="reference").

Floor: a decode step must read every weight it uses once: all non-expert weights (the LM head
included, the embedding table only for the looked-up rows), the experts that the step's tokens
select (8 per layer at batch 1; at batch 16 the distinct experts counted from the engine's
routing statistics), and the KV cache of every sequence. Floor = those bytes / the measured
device-to-device copy bandwidth (bytes read + written). Prefill's floor is the larger of the
weight bytes and its matmul FLOPs at the measured bf16 matmul rate.

transformers (qwen3 only; it has no GPT-MoE architecture): Qwen3MoeForCausalLM built on the meta
device whose parameters are views of the moeflow weights (no copy), `generate` with experts
"grouped_mm" (generate switches decoding to "batched_mm" itself) and "eager"; ms per token =
(time of n2 tokens - time of n1 tokens) / (n2 - n1), and a forward over 2048 tokens.

Example (one H100, ~4 minutes):
    PYTHONPATH=. python benchmarks/generate.py --out benchmarks/results

Several GPUs (tensor slicing × expert parallelism, benchmarks/generate_parallel.py):
    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/generate.py --tp 2 --ep 2 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

import dataclasses

from benchmarks.machine import cuda_event_ms
from moeflow import ModelConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.slot_cache import SlotKVCache
from moeflow.ops.backend import Backends

PROMPT = 32
TARGETS = {"decode_b1_ms": 2.6, "decode_b16_ms": 4.0, "prefill_2048_ms": 25.0}
ANCHORS = {  # the measurement: transformers 5.17 on an H100, same shape
    "grouped_mm": {"decode_b1_ms": 124.6, "decode_b16_ms": 104.6, "prefill_2048_ms": 98.0},
    "eager": {"decode_b1_ms": 145.0, "decode_b16_ms": 1026.0, "prefill_2048_ms": 480.0},
}


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def step_ms(engine: Engine, steps: int) -> list[float]:
    """Wall time of each of `steps` engine steps, device synchronised, in ms."""
    times = []
    for _ in range(steps):
        t0 = sync_time()
        engine.step()
        times.append((sync_time() - t0) * 1e3)
    return times


def ceilings() -> dict:
    a = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    copy_ms = cuda_event_ms(lambda: b.copy_(a), 20)  # noqa: F821 (closure; a later del frees it)
    del a, b
    n = 8192
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    x @ y
    mm_ms = cuda_event_ms(lambda: x @ y, 20)
    return {"copy_GBps": 2 * (2 << 30) / copy_ms / 1e6,
            "bf16_matmul_TFLOPs": 2 * n ** 3 / mm_ms / 1e9}


def build(name: str) -> Transformer:
    cfg = ModelConfig.from_name(name).replace(max_seq_len=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def step_bytes(model: Transformer, distinct_experts: float, batch: int, kv_tokens: float) -> float:
    """Bytes one decode step reads: weights used + KV cache of `batch` sequences."""
    total, seen = 0.0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "pos_emb.weight" or (name == "tok_emb.weight"
                                        and not model.config.tie_embeddings):
            total += batch * p.shape[1] * p.element_size()
        elif ".experts." in name:
            total += p.nbytes * distinct_experts / p.shape[0]
        else:
            total += p.nbytes
    return total + batch * kv_tokens * SlotKVCache.bytes_per_token(model)


def prefill_flops(model: Transformer, T: int) -> float:
    c = model.config
    active = 0
    for name, p in model.named_parameters():
        if name in ("tok_emb.weight", "pos_emb.weight"):
            continue
        frac = 1.0
        if ".experts." in name:
            frac = c.router.top_k / p.shape[0]
        active += p.numel() * frac
    qk = c.mla.qk_head_dim if c.mla else c.head_dim
    attn = 2 * T * T * c.n_heads * 2 * qk * c.n_layers / 2  # causal: half of QKᵀ and PV
    return 2 * active * T + attn


def decoding_engine(model: Transformer, batch: int, max_seq_len: int = 1024,
                    warm_steps: int = 5) -> Engine:
    """An engine sized for `batch`, decoding `batch` greedy requests of PROMPT random tokens
    (ids < 1000), after `warm_steps` steps (the prefill, the decode graph's capture, warm-up)."""
    engine = Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=max_seq_len))
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 1000, (PROMPT,), generator=g).tolist(),
                           SamplingParams(max_new_tokens=200, temperature=0))
    for _ in range(warm_steps):
        engine.step()
    return engine


def engine_decode(engine: Engine, batch: int, steps: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = [engine.add_request(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(),
                              SamplingParams(max_new_tokens=2 * steps + 24, temperature=0))
           for _ in range(batch)]
    engine.step()  # prefill all
    for _ in range(3):  # capture + warm
        engine.step()
    times = step_ms(engine, steps)
    out = {"step_ms": statistics.median(times), "step_ms_min": min(times)}
    # A serving loop's rate: consecutive steps, the device synchronised only around the run (the
    # engine overlaps a step's host work with the next step's decode; step_ms syncs each step).
    t0 = sync_time()
    for _ in range(steps):
        engine.step()
    out["run_ms"] = (sync_time() - t0) * 1e3 / steps
    dec = engine._decoder
    if hasattr(dec, "graphs") and dec.graphs:
        graph = dec.graphs[dec.last_key][0]
        with dec.held_state():  # the replays advance the lengths: back for the next steps
            out["graph_replay_ms"] = cuda_event_ms(graph.replay, 20)
        out["graph_key"] = list(dec.last_key)
    distinct = []
    for _ in range(8):
        before = engine.stats().expert_counts
        engine.step()
        after = engine.stats().expert_counts
        per_layer = [sum(b != a for a, b in zip(x, y)) for x, y in zip(before, after)]
        distinct.append(sum(per_layer) / max(len(per_layer), 1))
    out["distinct_experts_per_layer"] = statistics.mean(distinct) if distinct else 0.0
    out["kv_tokens_mean"] = PROMPT + 4 + steps / 2
    for rid in ids:
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return out


def engine_prefill(engine: Engine, T: int, vocab: int, reps: int = 4) -> dict:
    g = torch.Generator().manual_seed(T)
    times = []
    for _ in range(reps):
        engine.add_request(torch.randint(0, vocab, (T,), generator=g).tolist(),
                           SamplingParams(max_new_tokens=1, temperature=0))
        t0 = sync_time()
        engine.step()
        times.append((sync_time() - t0) * 1e3)
    return {"ms": statistics.median(times[1:]), "first_ms": times[0]}


def profile_kernels(fn, top: int = 12) -> dict:
    """GPU kernels of one call of `fn` (graph replays included): count and the top by time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.count, getattr(e, "device_time_total", 0.0)) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "total_us": sum(r[2] for r in rows),
            "top": [[k[:90], c, round(t, 1)] for k, c, t in rows[:top]]}


def profiles(engine: Engine, vocab: int) -> dict:
    """Kernel breakdown of one batch-1 decode step and one 2048-token prefill."""
    g = torch.Generator().manual_seed(11)
    rid = engine.add_request(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(),
                             SamplingParams(max_new_tokens=20, temperature=0))
    for _ in range(4):
        engine.step()
    out = {"decode_b1_step": profile_kernels(engine.step)}
    engine.abort(rid)
    engine.step()
    engine.add_request(torch.randint(0, vocab, (2048,), generator=g).tolist(),
                       SamplingParams(max_new_tokens=1, temperature=0))
    out["prefill_2048_step"] = profile_kernels(engine.step)
    return out


def prefill_variants(model: Transformer, engine: Engine, vocab: int) -> dict:
    """Prefill with each MoE op forced to another backend (which path the choosers should take)."""
    base = model.backends
    variants = {"experts=grouped_mm": ("experts", "grouped_mm"),
                "router=reference": ("router", "reference"),
                "dispatch=reference": ("dispatch", "reference")}
    out = {}
    for label, (part, backend) in variants.items():
        model.set_backends(dataclasses.replace(base, **{part: backend}))
        try:
            out[label] = engine_prefill(engine, 2048, vocab, reps=3)["ms"]
        except Exception as err:
            out[label] = f"error: {type(err).__name__}: {err}"[:300]
    model.set_backends(base)
    return out


def parity(model: Transformer, engine: Engine, vocab: int) -> dict:
    """Engine decode logits vs a full forward over the same tokens (bf16), routed as the engine
    routes (inference=True: dropless)."""
    seen = []
    engine.logits_hook = lambda rid, row: seen.append(row.float().clone())
    prompt = torch.randint(0, vocab, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0]
    engine.logits_hook = None
    with torch.no_grad():
        full = model(torch.tensor([prompt + out], device=engine.device),
                     inference=True).logits[0].float()
    errs = [float((row - full[PROMPT - 1 + i]).norm() / full[PROMPT - 1 + i].norm())
            for i, row in enumerate(seen)]
    agree = sum(int(full[PROMPT - 1 + i].argmax()) == t for i, t in enumerate(out))
    return {"max_rel_logit_err": max(errs), "argmax_agree": f"{agree}/{len(out)}"}


def run_engine(model: Transformer, fuse: bool, steps: int, res: dict, log,
               extra: bool = False) -> None:
    model.set_backends(Backends(fuse="auto" if fuse else "reference"))  # before the engine's cache
    tag = "fused" if fuse else "unfused"
    vocab = model.config.vocab_size
    engine = Engine(model, EngineConfig(max_batch_size=16, max_seq_len=4096))
    r = res.setdefault(f"engine_{tag}", {})
    try:
        t0 = time.perf_counter()
        if fuse:
            r["parity"] = parity(model, engine, vocab)
            log(f"  parity {r['parity']}")
        r["decode_b1"] = engine_decode(engine, 1, steps, vocab)
        log(f"  b1 {r['decode_b1']}")
        r["decode_b16"] = engine_decode(engine, 16, steps, vocab)
        log(f"  b16 {r['decode_b16']}")
        r["prefill_2048"] = engine_prefill(engine, 2048, vocab)
        log(f"  prefill {r['prefill_2048']}")
        if fuse and extra:
            r["prefill_variants"] = prefill_variants(model, engine, vocab)
            log(f"  prefill variants {r['prefill_variants']}")
            r["profile"] = profiles(engine, vocab)
            for k, v in r["profile"].items():
                log(f"  profile {k}: {v['kernels']} kernels, {v['total_us']:.0f} us")
                for row in v["top"]:
                    log(f"    {row}")
        r["wall_s"] = time.perf_counter() - t0
    except Exception:
        r["error"] = traceback.format_exc()[-2000:]
        log(r["error"])
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        model.set_backends(Backends())


def hf_twin(model: Transformer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeflow.interop.hf_config import config_to_hf
    from moeflow.interop.hf_weights import weight_rules

    d = config_to_hf(model.config)
    cfg = AutoConfig.for_model(**d)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    state = model.state_dict()
    shared = {}
    for rule in weight_rules(model.config, d["model_type"]):
        t = state[rule.moeflow]
        if rule.alt is not None:  # fused expert layout [E, out, in]: a transposed view
            shared[rule.alt.hf[0]] = t.transpose(1, 2)
        else:
            shared.update(zip(rule.hf, rule.split(t)))
    hf.load_state_dict(shared, strict=True, assign=True)
    device = next(model.parameters()).device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(device)
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"HF twin left on meta: {meta[:3]}")
    return hf.eval()


def hf_measure(model: Transformer, res: dict, log, quick: bool) -> None:
    hf = hf_twin(model)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (1, 16), device="cuda")
    with torch.no_grad():
        a = model(x, inference=True).logits.float()  # HF routes dropless
        b = hf(x).logits.float()
    res["hf_parity_rel_err"] = float((a - b).norm() / b.norm())
    log(f"  hf parity {res['hf_parity_rel_err']:.3e}")
    plan = {"grouped_mm": {1: (4, 16), 16: (4, 12)}, "eager": {1: (2, 10), 16: (2, 5)}}
    if quick:
        plan = {"grouped_mm": {1: (2, 4), 16: (2, 4)}, "eager": {1: (2, 4), 16: (1, 2)}}
    for impl, per_batch in plan.items():
        r = res.setdefault(f"hf_{impl}", {})
        try:
            hf.set_experts_implementation(impl)
            for batch, (n1, n2) in per_batch.items():
                ids = torch.randint(0, vocab, (batch, PROMPT), device="cuda")

                def gen(n):
                    t0 = sync_time()
                    with torch.no_grad():
                        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: F821 (closure; a later del frees it)
                                    min_new_tokens=n, do_sample=False, pad_token_id=0)
                    return sync_time() - t0

                gen(1)
                t1, t2 = gen(n1), gen(n2)
                r[f"decode_b{batch}_ms"] = (t2 - t1) / (n2 - n1) * 1e3
                r[f"decode_b{batch}_tokens"] = [n1, n2]
                log(f"  hf {impl} b{batch}: {r[f'decode_b{batch}_ms']:.1f} ms")
            xs = torch.randint(0, vocab, (1, 2048), device="cuda")
            times = []
            for _ in range(3):
                t0 = sync_time()
                with torch.no_grad():
                    hf(xs, logits_to_keep=1, use_cache=False)
                times.append((sync_time() - t0) * 1e3)
            r["prefill_2048_ms"] = statistics.median(times[1:])
            log(f"  hf {impl} prefill {r['prefill_2048_ms']:.1f} ms")
        except Exception:
            r["error"] = traceback.format_exc()[-2000:]
            log(r["error"])
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def floors(model: Transformer, res: dict, ceil: dict) -> None:
    bw = ceil["copy_GBps"] * 1e9
    eng = res.get("engine_fused", {})
    f = res.setdefault("floor", {})
    for batch in (1, 16):
        d = eng.get(f"decode_b{batch}")
        k = model.config.router.top_k
        distinct = d["distinct_experts_per_layer"] if d else float(min(k * batch, 128))
        kv = d["kv_tokens_mean"] if d else PROMPT + 30
        nbytes = step_bytes(model, distinct, batch, kv)
        f[f"decode_b{batch}"] = {"bytes": nbytes, "ms": nbytes / bw * 1e3,
                                 "distinct_experts_per_layer": distinct}
    all_bytes = step_bytes(model, float(max(model.config.num_experts)), 1, 2048)
    flops = prefill_flops(model, 2048)
    f["prefill_2048"] = {"bytes_ms": all_bytes / bw * 1e3,
                         "flops_ms": flops / (ceil["bf16_matmul_TFLOPs"] * 1e12) * 1e3,
                         "flops": flops}
    f["prefill_2048"]["ms"] = max(f["prefill_2048"]["bytes_ms"], f["prefill_2048"]["flops_ms"])


def markdown(results: dict) -> str:
    lines = [f"# Generation benchmark ({results['gpu']}, {results['date']})", "",
             f"Command: `{results['command']}`", "",
             f"Measured ceilings: copy {results['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{results['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s.", ""]
    for name, res in results["models"].items():
        lines += [f"## {name}", "",
                  "| | decode b1 ms/token | decode b16 ms/step | prefill 2048 ms |",
                  "|---|---|---|---|"]
        fl = res.get("floor", {})

        def cell(v, key):
            if v is None:
                return "—"
            floor = fl.get(key, {}).get("ms")
            return f"{v:.2f} ({v / floor:.2f}× floor)" if floor else f"{v:.2f}"

        for tag in ("engine_fused", "engine_unfused"):
            e = res.get(tag, {})
            if not e:
                continue
            row = [e.get("decode_b1", {}).get("step_ms"), e.get("decode_b16", {}).get("step_ms"),
                   e.get("prefill_2048", {}).get("ms")]
            lines.append(f"| moeflow engine ({tag[7:]}) | {cell(row[0], 'decode_b1')} | "
                         f"{cell(row[1], 'decode_b16')} | {cell(row[2], 'prefill_2048')} |")
            g = [e.get(k, {}).get("graph_replay_ms") for k in ("decode_b1", "decode_b16")]
            if any(v is not None for v in g):
                lines.append(f"| └ graph replay only ({tag[7:]}) | {cell(g[0], 'decode_b1')} | "
                             f"{cell(g[1], 'decode_b16')} | |")
        for impl in ("grouped_mm", "eager"):
            h = res.get(f"hf_{impl}")
            if h:
                lines.append(f"| transformers {impl} | {cell(h.get('decode_b1_ms'), 'decode_b1')} |"
                             f" {cell(h.get('decode_b16_ms'), 'decode_b16')} | "
                             f"{cell(h.get('prefill_2048_ms'), 'prefill_2048')} |")
        if fl:
            lines.append(f"| bandwidth/compute floor | {fl['decode_b1']['ms']:.2f} | "
                         f"{fl['decode_b16']['ms']:.2f} | {fl['prefill_2048']['ms']:.2f} |")
        if name == "qwen3-30b-a3b":
            lines.append(f"| target (issue) | ≤ {TARGETS['decode_b1_ms']} | ≤ "
                         f"{TARGETS['decode_b16_ms']} | ≤ {TARGETS['prefill_2048_ms']} |")
            for impl, a in ANCHORS.items():
                lines.append(f"| issue's anchor: transformers {impl} | {a['decode_b1_ms']} | "
                             f"{a['decode_b16_ms']} | {a['prefill_2048_ms']} |")
        notes = [f"{k}: {v}" for k, v in res.items()
                 if k.endswith("parity") or k == "hf_parity_rel_err"]
        notes += [f"engine parity: {res.get('engine_fused', {}).get('parity')}"]
        if fl:
            notes.append(f"distinct experts per layer per step: b1 "
                         f"{fl['decode_b1']['distinct_experts_per_layer']:.1f}, b16 "
                         f"{fl['decode_b16']['distinct_experts_per_layer']:.1f}")
        errors = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
        if errors:
            notes.append(f"errors in: {', '.join(errors)} (see JSON)")
        lines += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b,350m-moe128")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="generate")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-unfused", action="store_true")
    ap.add_argument("--quick-hf", action="store_true", help="fewer transformers tokens")
    ap.add_argument("--profile", action="store_true",
                    help="kernel breakdown of a decode step and a prefill; "
                         "prefill backend variants")
    ap.add_argument("--tp", type=int, default=None,
                    help="under torchrun: tensor-parallel size (see generate_parallel.py)")
    ap.add_argument("--ep", type=int, default=None,
                    help="under torchrun: expert-parallel replicas (world = tp × ep)")
    ap.add_argument("--a2a", choices=("coordinated", "plain"), default="coordinated")
    args = ap.parse_args()
    if args.tp is not None or args.ep is not None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from generate_parallel import run

        args.tp, args.ep = args.tp or 1, args.ep or 1
        if args.models == "qwen3-30b-a3b,350m-moe128":
            args.models = "qwen3-30b-a3b,1.3b-moe128"
        run(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / f"{args.name}.log", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    results = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "command": "python benchmarks/generate.py " +
               " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in vars(args).items() if v not in (False, None)),
               "targets": TARGETS, "anchors_issue": ANCHORS, "models": {}}
    results["ceilings"] = ceilings()
    log(f"ceilings {results['ceilings']}")

    def save():
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
        (out / f"{args.name}.md").write_text(markdown(results))

    for name in args.models.split(","):
        log(f"== {name}")
        t0 = time.perf_counter()
        model = build(name)
        res = results["models"].setdefault(name, {})
        res["build_s"] = time.perf_counter() - t0
        res["param_GB"] = sum(p.nbytes for p in model.parameters()) / 1e9
        run_engine(model, True, args.steps, res, log, extra=args.profile)
        floors(model, res, results["ceilings"])
        save()
        if not args.no_unfused:
            run_engine(model, False, args.steps, res, log)
            save()
        if not args.no_hf and name.startswith("qwen3"):
            try:
                hf_measure(model, res, log, args.quick_hf)
            except Exception:
                res["hf_error"] = traceback.format_exc()[-2000:]
                log(res["hf_error"])
            save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
