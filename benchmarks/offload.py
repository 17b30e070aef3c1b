"""Serving an MoE model larger than its GPU-memory budget: moeflow's expert offloading vs
all-on-GPU and vs transformers + accelerate `device_map="auto"` at the same budget.

Models: random bf16 weights built on the GPU, Mixtral-8x7B shape (d 4096, 8 experts of width
14336, top-2, 32/8 heads, vocab 32000) and Qwen3-30B-A3B shape (d 2048, 128 experts of width
768, top-8). Fewer layers than the real models (--mixtral-layers, --qwen3-layers) so that
the stack, its pinned host copy and the peer fit 128 GB of host RAM and the run fits 8 minutes.

Budgets: given for the full-depth model (Mixtral 24 and 40 GiB, Qwen3 16 and 24 GiB, the
issue's), and scaled to the shorter stack so that the expert cache holds the same *fraction* of
all experts as the full model would at that budget: budget_L = fixed_L + f · experts_L, with
f = (budget_full - non-expert_full - KV_full - activations) / experts_full. The hit rate, and so
the copy traffic per layer, depends on that fraction; the enforced budget is budget_L, by the
engine's plan and by torch.cuda.set_per_process_memory_fraction, and the peak
(torch.cuda.max_memory_allocated) is reported against it.

Per configuration (wall time of Engine.step() with a sync, sampling included):
  prefill: one 512-token prompt (two in a row, the second reported; the first is in the JSON);
  decode batch 1 and batch 16: prompts of 64 tokens, greedy, tokens/s over the timed steps;
  copy traffic per decode token, the expert-cache hit rate and the pre-gate recall (the share
  of needed experts that were predicted) over those steps;
  transfer floor: bytes copied per token / the measured pinned host→device bandwidth, and the
  measured time per token as a multiple of it.
Configurations: all on the GPU (no budget, CUDA graphs); offloaded with LRU and LFU without
prefetch; with zero-shot pre-gating (prefetch="router") under LRU and LFU. Peer (Mixtral shape,
the smaller budget): transformers' MixtralForCausalLM dispatched by accelerate
(infer_auto_device_map with max_memory = 90 % of the budget for weights, the rest for
activations; dispatch_model), `generate` greedy: prefill = time of 1 new token after a 512-token
prompt, decode = (time of n tokens - time of 1 token) / (n - 1) after a 64-token prompt.

Random weights route uniformly at random: the worst case for a cache; a trained model's
routing has locality and hits more often (not measured here).

Run (one H200, ~6 minutes; writes offload.json, offload.md, offload.log under --out):
    PYTHONPATH=. python benchmarks/offload.py --out $OUT
accelerate is not in the GPU image by default; carry its wheel (pure Python) and install it
without dependencies first, or the peer is reported as not importable:
    pip download --no-deps accelerate==1.15.0 -d wheels      (here, once)
    pip install --no-deps wheels/accelerate-*.whl &&
        PYTHONPATH=. python benchmarks/offload.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from moeflow import ModelConfig, Transformer
from moeflow.infer import Engine, EngineConfig, SamplingParams
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.placement import activation_bytes, non_expert_bytes, plan_offload
from moeflow.infer.slot_cache import SlotKVCache

GiB = 1 << 30
SHAPES = {
    "mixtral": dict(arch="llama", vocab_size=32000, d_model=4096, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336, expert_d_ff=14336, rope_theta=1e6, norm_eps=1e-5,
                    moe_every=1, num_experts=8,
                    router=dict(top_k=2, dropless=True, normalize_topk=True)),
    "qwen3": dict(arch="llama", vocab_size=151936, d_model=2048, n_heads=32, n_kv_heads=4,
                  head_dim=128, d_ff=6144, expert_d_ff=768, rope_theta=1e6, norm_eps=1e-6,
                  qk_norm=True, moe_every=1, num_experts=128,
                  router=dict(top_k=8, dropless=True, normalize_topk=True)),
}
FULL_LAYERS = {"mixtral": 32, "qwen3": 48}
BUDGETS_GIB = {"mixtral": (24, 40), "qwen3": (16, 24)}
CONFIGS = (("lru", "none"), ("lfu", "none"), ("lru", "router"), ("lfu", "router"))
MAX_SEQ = 1024
PROMPT = 64
PREFILL = 512


def log(msg: str, sink: list[str]) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    sink.append(line)


SMOKE = dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             expert_d_ff=128)


def model_config(shape: str, layers: int, smoke: bool = False) -> ModelConfig:
    """`smoke`: the same structure at toy widths, to check the script on a CPU."""
    kw = {**SHAPES[shape], **(SMOKE if smoke else {})}
    return ModelConfig(name=f"{shape}-{layers}L", n_layers=layers, max_seq_len=MAX_SEQ, **kw)


def expert_and_other_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(expert bytes, non-expert bytes) in bf16, from a meta-device build."""
    model = meta_model(cfg)
    experts = sum(p.nbytes for m in model.moe_layers() for p in m.experts.parameters())
    return experts, non_expert_bytes(model)


def meta_model(cfg: ModelConfig) -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return Transformer(cfg)
    finally:
        torch.set_default_dtype(default)


def cache_fraction(shape: str, budget_gib: float) -> float:
    """Share of all experts the real full-depth model's cache holds at `budget_gib`, with the
    benchmark's engine settings (16 sequences of MAX_SEQ tokens, activations as on CUDA)."""
    model = meta_model(model_config(shape, FULL_LAYERS[shape]))
    experts = sum(p.nbytes for m in model.moe_layers() for p in m.experts.parameters())
    kv = SlotKVCache.bytes_per_token(model) * 16 * MAX_SEQ
    act = activation_bytes(model, MAX_SEQ, 16, torch.device("cuda"))
    return (budget_gib * GiB - non_expert_bytes(model) - kv - act) / experts


def h2d_bandwidth() -> float:
    """Pinned host → device copy rate, bytes/s (median of 5 copies of 1 GiB)."""
    if not torch.cuda.is_available():
        return 10e9  # --smoke on CPU: a nominal figure, only to exercise the arithmetic
    src = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return GiB / statistics.median(times[1:])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed_step(engine: Engine) -> tuple[float, list]:
    sync()
    t0 = time.perf_counter()
    events = engine.step()
    sync()
    return time.perf_counter() - t0, events


def offload_counts(engine: Engine) -> dict | None:
    s = engine.stats().offload
    if s is None:
        return None
    return {**dataclasses.asdict(s.cache), "pred_needed": s.prefetch.needed,
            "pred_correct": s.prefetch.correct, "pred_predicted": s.prefetch.predicted}


def delta(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    return {k: after[k] - before[k] for k in after}


def rates(d: dict | None, tokens: int, bandwidth: float, seconds: float) -> dict:
    if d is None:
        return {}
    floor = d["bytes_copied"] / tokens / bandwidth
    return {"hit_rate": d["hits"] / max(d["lookups"], 1),
            "pregate_recall": (d["pred_correct"] / d["pred_needed"]) if d["pred_needed"] else None,
            "copied_GB_per_token": d["bytes_copied"] / tokens / 1e9,
            "transfer_floor_ms": 1e3 * floor,
            "x_floor": (seconds / tokens) / floor if floor else None,
            "prefetch_skipped": d["prefetch_skipped"]}


def measure(engine: Engine, vocab: int, bandwidth: float, decode_steps: dict[int, int]) -> dict:
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    prefill_s = []
    for _ in range(2):
        engine.add_request(torch.randint(0, vocab, (PREFILL,), generator=g).tolist(),
                           SamplingParams(max_new_tokens=1, temperature=0))
        before = offload_counts(engine)
        seconds, _ = timed_step(engine)
        prefill_s.append(seconds)
        d = delta(offload_counts(engine), before)
    out["prefill_512_ms"] = 1e3 * prefill_s[-1]
    out["prefill_512_first_ms"] = 1e3 * prefill_s[0]
    out["prefill_512_tokens_per_s"] = PREFILL / prefill_s[-1]
    if d is not None:
        out["prefill_copied_GB"] = d["bytes_copied"] / 1e9
    for batch, steps in decode_steps.items():
        for _ in range(batch):
            engine.add_request(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=steps + 8, temperature=0))
        while engine.scheduler.waiting:  # admit and prefill everyone
            engine.step()
        for _ in range(3):  # warm-up (graph capture on the resident engine)
            engine.step()
        before = offload_counts(engine)
        times = [timed_step(engine)[0] for _ in range(steps)]
        d = delta(offload_counts(engine), before)
        total = sum(times)
        out[f"decode_b{batch}"] = {
            "tokens_per_s": batch * steps / total, "median_step_ms": 1e3 * statistics.median(times),
            "steps": steps, **rates(d, steps * batch if d else 1, bandwidth, total / batch)}
        for r in list(engine.scheduler.running):
            engine.abort(r.request_id)
        while engine.has_work():
            engine.step()
    return out


def with_budget(budget: int | None):
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else budget / total)


def run_shape(shape: str, layers: int, bandwidth: float, args, sink: list[str]) -> dict:
    cfg = model_config(shape, layers, args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full_cfg = model_config(shape, FULL_LAYERS[shape], args.smoke)
    experts_full, other_full = expert_and_other_bytes(full_cfg)
    experts_L, other_L = expert_and_other_bytes(cfg)
    result: dict = {"layers": layers, "full_layers": FULL_LAYERS[shape],
                    "expert_GB": experts_L / 1e9, "non_expert_GB": other_L / 1e9,
                    "full_depth_GB": (experts_full + other_full) / 1e9, "runs": {}}
    log(f"{shape}: {layers} layers, experts {experts_L / GiB:.1f} GiB + other "
        f"{other_L / GiB:.1f} GiB (full depth {(experts_full + other_full) / GiB:.1f} GiB)", sink)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    decode = {1: args.decode_b1_steps, 16: args.decode_b16_steps}
    engine_kw = dict(max_batch_size=16, max_seq_len=MAX_SEQ)
    engine = None
    try:
        reset_peak()
        engine = Engine(model, EngineConfig(**engine_kw))
        r = measure(engine, cfg.vocab_size, bandwidth, decode)
        r["peak_GiB"] = peak_bytes() / GiB
        result["runs"]["all_on_gpu"] = r
        log(f"  all on GPU: {json.dumps(r)}", sink)
    except Exception as err:  # noqa: BLE001 - a failed configuration is reported, not fatal
        result["runs"]["all_on_gpu"] = {"error": f"{type(err).__name__}: {err}"[:400]}
        log(traceback.format_exc(), sink)
    del engine
    gc.collect()
    reset_peak()
    for budget_full in BUDGETS_GIB[shape]:
        frac = cache_fraction(shape, budget_full)
        for policy, prefetch in CONFIGS:
            name = f"{budget_full}GiB/{policy}/{prefetch}"
            try:
                with_budget(None)
                probe = OffloadConfig(gpu_memory="1TiB", expert_cache_policy=policy,
                                      prefetch=prefetch, device=device)
                kv = SlotKVCache.bytes_per_token(model) * 16 * MAX_SEQ
                plan = plan_offload(model, probe, kv, MAX_SEQ, 16)
                budget = int(plan.fixed + frac * experts_L)
                off = dataclasses.replace(probe, gpu_memory=str(budget))
                engine = Engine(model, EngineConfig(**engine_kw, offload=off))
                gc.collect()
                reset_peak()
                with_budget(budget)
                r = measure(engine, cfg.vocab_size, bandwidth, decode)
                peak = peak_bytes()
                plan = engine.offload.plan
                r.update(budget_GiB=budget / GiB, full_depth_budget_GiB=budget_full,
                         cache_fraction=plan.slots * plan.expert / experts_L,
                         slots=plan.slots, peak_GiB=peak / GiB, within_budget=peak <= budget,
                         plan_GiB={k: v / GiB for k, v in dataclasses.asdict(plan).items()
                                   if k not in ("slots", "min_slots")})
                result["runs"][name] = r
                log(f"  {name}: {json.dumps(r)}", sink)
                del engine
            except Exception as err:  # noqa: BLE001
                result["runs"][name] = {"error": f"{type(err).__name__}: {err}"[:400]}
                log(traceback.format_exc(), sink)
            finally:
                with_budget(None)
                gc.collect()
                reset_peak()
    del model
    gc.collect()
    reset_peak()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give the pinned host copies back before the next model
    return result


def run_peer(layers: int, budget: int, sink: list[str]) -> dict:
    """transformers MixtralForCausalLM + accelerate dispatch under `budget` bytes."""
    try:
        import accelerate
        import transformers
        from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
    except ImportError as err:
        return {"error": f"not importable: {err}"}
    s = SHAPES["mixtral"]
    hf_cfg = transformers.MixtralConfig(
        vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["expert_d_ff"],
        num_hidden_layers=layers, num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"], num_local_experts=s["num_experts"],
        num_experts_per_tok=2, max_position_embeddings=MAX_SEQ, rope_theta=s["rope_theta"])
    with init_empty_weights(include_buffers=False):
        model = transformers.MixtralForCausalLM(hf_cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, p in list(model.named_parameters()):
        value = torch.randn(p.shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        if "norm" in name:
            value.fill_(1.0)
        set_module_tensor_to_device(model, name, "cpu", value=value.cpu())
        del value
    model.eval()
    device_map = infer_auto_device_map(model, max_memory={0: int(0.9 * budget),
                                                          "cpu": 400 * GiB},
                                       no_split_module_classes=model._no_split_modules,
                                       dtype=torch.bfloat16)
    on_gpu = sum(1 for v in device_map.values() if v == 0)
    model = dispatch_model(model, device_map=device_map)
    with_budget(budget)
    torch.cuda.reset_peak_memory_stats()
    out = {"transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "budget_GiB": budget / GiB, "weights_max_memory_GiB": 0.9 * budget / GiB,
           "modules_on_gpu": on_gpu, "modules": len(device_map)}
    try:
        vocab = s["vocab_size"]

        def gen(prompt_len: int, new: int, model=model) -> float:
            ids = torch.randint(0, vocab, (1, prompt_len), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        gen(8, 1)  # warm-up
        out["prefill_512_ms"] = 1e3 * gen(PREFILL, 1)
        t1, n = gen(PROMPT, 1), 4
        tn = gen(PROMPT, n)
        out["decode_b1"] = {"ms_per_token": 1e3 * (tn - t1) / (n - 1),
                            "tokens_per_s": (n - 1) / (tn - t1)}
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / GiB
        out["within_budget"] = torch.cuda.max_memory_allocated() <= budget
    except Exception as err:  # noqa: BLE001
        out["error"] = f"{type(err).__name__}: {err}"[:400]
        log(traceback.format_exc(), sink)
    finally:
        with_budget(None)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def table(results: dict) -> str:
    lines = ["| shape | config | budget GiB (full-depth) | peak GiB | prefill 512 tok/s | "
             "decode b1 tok/s | b1 hit | b1 recall | b1 × floor | decode b16 tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, res in results["shapes"].items():
        for name, r in res["runs"].items():
            if "error" in r:
                lines.append(f"| {shape} | {name} | error: {r['error'][:80]} |")
                continue
            b1, b16 = r["decode_b1"], r["decode_b16"]

            def f(x, fmt="{:.2f}"):
                return "-" if x is None else fmt.format(x)
            budget = (f"{r['budget_GiB']:.1f} ({r['full_depth_budget_GiB']})"
                      if "budget_GiB" in r else "-")
            lines.append(
                f"| {shape} | {name} | {budget} | {f(r.get('peak_GiB', r.get('peak_GB')))} | "
                f"{r['prefill_512_tokens_per_s']:.0f} | {b1['tokens_per_s']:.2f} | "
                f"{f(b1.get('hit_rate'))} | {f(b1.get('pregate_recall'))} | "
                f"{f(b1.get('x_floor'))} | {b16['tokens_per_s']:.1f} |")
    peer = results.get("peer")
    if peer:
        lines.append("")
        lines.append(f"peer (transformers + accelerate, mixtral shape): {json.dumps(peer)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--mixtral-layers", type=int, default=12)
    p.add_argument("--qwen3-layers", type=int, default=16)
    p.add_argument("--decode-b1-steps", type=int, default=24)
    p.add_argument("--decode-b16-steps", type=int, default=6)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="toy widths on the CPU: checks the script, measures nothing")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sink: list[str] = []
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        p.error("needs a CUDA device (or --smoke to check the script on the CPU)")
    name = torch.cuda.get_device_properties(0).name if cuda else "cpu (smoke)"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    bandwidth = h2d_bandwidth()
    results = {"gpu": name, "gpu_total_GiB": total / GiB,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "torch": torch.__version__, "h2d_GBps": bandwidth / 1e9,
               "command": "PYTHONPATH=. python benchmarks/offload.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k != "out" and v is not False),
               "shapes": {}}
    log(f"{name}: pinned host->device {bandwidth / 1e9:.1f} GB/s", sink)
    layers = {"mixtral": args.mixtral_layers, "qwen3": args.qwen3_layers}
    for shape in args.shapes:
        results["shapes"][shape] = run_shape(shape, layers[shape], bandwidth, args, sink)
        if shape == "mixtral" and not args.no_peer and cuda:
            runs = results["shapes"]["mixtral"]["runs"]
            budget = next((r["budget_GiB"] for r in runs.values() if "budget_GiB" in r), None)
            if budget is not None:
                log("peer: transformers + accelerate", sink)
                results["peer"] = run_peer(args.mixtral_layers, int(budget * GiB), sink)
                log(f"  peer: {json.dumps(results['peer'])}", sink)
        (out / "offload.json").write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - start
    (out / "offload.json").write_text(json.dumps(results, indent=2))
    (out / "offload.md").write_text(table(results) + "\n")
    (out / "offload.log").write_text("\n".join(sink) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
