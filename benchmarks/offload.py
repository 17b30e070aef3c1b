"""Serving an MoE model larger than its GPU-memory budget: moeflow's expert offloading vs
all-on-GPU and vs transformers + accelerate `device_map="auto"` at the same budget.

Models: random bf16 weights built on the GPU, Mixtral-8x7B shape (d 4096, 8 experts of width
14336, top-2, 32/8 heads, vocab 32000) and Qwen3-30B-A3B shape (d 2048, 128 experts of width
768, top-8). Fewer layers than the real models (--mixtral-layers, --qwen3-layers) so that
the stack, its pinned host copy and the peer fit 128 GB of host RAM and the run fits 7 minutes.

Budgets: given for the full-depth model (the issue's: Mixtral 24 and 40 GiB, Qwen3 16 and 24
GiB; by default only the smaller one, --budgets large or all for the larger or both), and
scaled to the shorter stack so that the expert cache holds the same *fraction* of all experts
as the full model would at that budget: budget_L = fixed_L + f · experts_L, with
f = (budget_full - non-expert_full - KV_full - activations) / experts_full. The hit rate,
and so the copy traffic per layer, depends on that fraction; the enforced budget is budget_L,
by the engine's plan and by torch.cuda.set_per_process_memory_fraction, and the peak
(torch.cuda.max_memory_allocated) is reported against it.

One process per configuration: the parent starts this script again with --child for each
configuration (and for the peer), so every one starts from a fresh CUDA context: nothing a
previous configuration allocated (cache slots, engine, compiled graphs) counts against the next
one's budget, and its peak is its own. Each child builds its model (random weights on the GPU)
and, offloaded, the pinned host copy of the experts (build_s in the JSON). The parent writes
offload.json / offload.md / offload.log after every configuration, and a global deadline
(--deadline-s, from the parent's start) skips the configurations that no longer fit and kills a
child that runs past it, so the files are always written.

Per configuration (wall time of Engine.step() with a sync, sampling included):
  prefill: one 512-token prompt (two in a row, the second reported; the first is in the JSON);
  decode batch 1 and batch 16: prompts of 64 random tokens, then tokens *sampled* at
  temperature 1 with a fixed seed per request. Sampled, not greedy: greedy decoding of a random
  model falls into repeating one token, its routing then repeats exactly and the cache hits
  ~99 % (what the first run showed for Qwen3), which says nothing about serving;
  copy traffic per decode token, the expert-cache hit rate and the pre-gate recall (the share
  of needed experts that were predicted) over those steps;
  transfer floor: bytes copied per token / the measured pinned host→device bandwidth, and the
  measured time per token as a multiple of it ("× floor"), reported only when the floor is at
  least 10 % of the time per token: below that the step is bound by compute and host overhead,
  not by copies, and the ratio says nothing about how well copies are hidden.
Configurations: all on the GPU (no budget, CUDA graphs); offloaded with each eviction policy
(--configs, policy/prefetch) without prefetch and with zero-shot pre-gating (prefetch="router");
a third part computes misses on the CPU (Fiddler, moeflow.infer.offload.cpu_experts):
"cyclic/router/auto" chooses per missed expert from the copy and CPU costs the engine measured
at start (reported in ms as cpu_expert_costs, with the row count up to which the CPU wins),
"cyclic/router/always" computes every miss there; "lfu/none/split" splits each miss that finds
no free slot between the device and the CPU (moeflow.infer.offload.split_experts; split_share:
the share of demanded experts split, split_cpu_columns: the CPU's share of their d_ff columns,
split_two_d_dma: whether the device shares were copied by one 2D DMA); cpu_expert_share is the
share of demanded experts computed on the CPU, and the hit rate counts both as misses. A
fourth part names the expert store: "lfu/none/off/packed" copies experts packed to 12 bits
per weight (moeflow.infer.offload.packed_store; its bytes per token are the packed bytes, so
its floor is too; `store_ratio`: packed over unpacked host bytes).
"policy/pregate" gives the random model pre-gate heads (moeflow.model.pregate; the trainer's
default width and depth) and fits them in the child, on the device, before the engine takes the
model over: --pregate-steps optimizer steps of moeflow.train.pregate's objective on batches of
random tokens (uniform over the vocabulary, like the prompts), the backbone frozen (fit_pregate).
The heads learn the random model's own routing, a deterministic function of its hidden states,
so they are trained pre-gates for this model, not stand-ins; their held-out recall and
zero-shot's on the same fresh sequences (teacher-forced, recall_counts) are in the JSON
(`pregate_heads`) and under the table, and the engine's decode recall in the table's column.
Every configuration's backbone is the same random draw (build_model). How heads trained on
text behave is measured on the CPU (benchmarks/pregate_hit_rate.py).
"policy/lookahead" gives the random model a random lookahead router (moeflow.model.lookahead,
a linear map of each token's and the previous token's embedding) that routes every layer, and
prefetches each decode step's experts at its start:
its speed, not its quality (benchmarks/lookahead_eval.py measures that on a trained model).
Peer (Mixtral shape, the smaller budget): transformers' MixtralForCausalLM dispatched by
accelerate (infer_auto_device_map with max_memory = the budget less two of the largest decoder
layers, which accelerate copies to the GPU to run CPU-placed layers, less 1 GiB for activations;
dispatch_model), `generate` sampled with a fixed seed: prefill = time of 1 new
token after a 512-token prompt, decode = (time of n tokens - time of 1 token) / (n - 1) after a
64-token prompt.

Random weights route uniformly at random: the worst case for a cache; a trained model's
routing has locality (benchmarks/offload_policy_replay.py replays trained routing on the CPU).

Run (one H200, at most --deadline-s = 420 s plus the last child's kill; writes offload.json,
offload.md, offload.log under --out):
    PYTHONPATH=. python benchmarks/offload.py --out $OUT
accelerate is not in the GPU image by default; carry its wheel (pure Python) and install it
without dependencies first, or the peer is reported as not importable:
    pip download --no-deps accelerate==1.15.0 -d wheels      (here, once)
    pip install --no-deps wheels/accelerate-*.whl &&
        PYTHONPATH=. python benchmarks/offload.py --out $OUT
Pre-gating compared (Mixtral shape, 12 layers, 24 GiB scaled; ~3-4 minutes):
    PYTHONPATH=. python benchmarks/offload.py --out $OUT --shapes mixtral \
        --configs cyclic/none cyclic/router cyclic/pregate --no-peer --no-resident
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the global deadline counts from here, before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from moeflow import ModelConfig, Transformer  # noqa: E402
from moeflow.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from moeflow.infer.offload import OffloadConfig  # noqa: E402
from moeflow.infer.offload.placement import activation_bytes, non_expert_bytes  # noqa: E402
from moeflow.infer.slot_cache import SlotKVCache  # noqa: E402
from moeflow.train.pregate import freeze_backbone, pregate_objective, recall_counts  # noqa: E402
from moeflow.train.run_config import TrainConfig  # noqa: E402
from moeflow.train.schedule import lr_at  # noqa: E402

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
# The default first (it is what a user gets), then the policies without prefetch: the first
# --core (4) run for both shapes before the peer and the rest.
CONFIGS = ("cyclic/router", "lru/none", "lfu/none", "cyclic/none", "lru/router", "lfu/router")
MAX_SEQ = 1024
PROMPT = 64
PREFILL = 512
MIN_CHILD_S = 25  # a configuration with less time than this left is skipped, not started
CHILD_CAP_S = 150  # no single configuration may take more than this (full depth: --child-cap-s)
# Children run with expandable segments unless the caller chose otherwise: with the default
# allocator the full-depth Mixtral run at 24 GiB held 1.45 GiB of cached split blocks beyond its
# 23.1 GiB of tensors and hit the per-process cap in its first prefill (2026-12-02). moeflow's
# CLI sets the same default when --gpu-memory is given.
ALLOC_CONF = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# "policy/pregate": pre-gate heads of the trainer's default width and depth, fitted in the child
# (fit_pregate) on batches of PREGATE_BATCH (sequences, tokens) of random tokens, then scored on
# PREGATE_HELDOUT fresh batches. lr 1e-3, not the 5e-3 of the trainer runs on a d_model-128
# model: in a one-off CPU sweep (2026-12-02; a random d_model-1024 model, 4 layers, top-2 of 8,
# 200 steps over 96k cached tokens) held-out recall was 0.552 / 0.567 / 0.573 / 0.575 / 0.569 at
# lr 1e-4 / 3e-4 / 1e-3 / 2e-3 / 5e-3, zero-shot 0.517. 300 steps of 2048 tokens: ~25 s for the
# 12-layer Mixtral shape at the H200's measured prefill rate (29k tokens/s all on the GPU).
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
PREGATE_RANK, PREGATE_DEPTH = _TRAIN_DEFAULTS["pregate_rank"], _TRAIN_DEFAULTS["pregate_depth"]
PREGATE_BATCH, PREGATE_HELDOUT = (8, 256), 4
PREGATE_SMOKE_BATCH = (2, 64)  # --smoke: the CPU runs ~1.4 s per step at the full batch
PREGATE_LR, PREGATE_WARMUP = 1e-3, 20
PREGATE_STEPS = 300
SMOKE = dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             expert_d_ff=128)


def log(msg: str, sink: list[str]) -> None:
    line = f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:.0f}s] {msg}"
    print(line, flush=True)
    sink.append(line)


# -- models and budgets (no device needed) --------------------------------------------------

def model_config(shape: str, layers: int, smoke: bool = False, prefetch: str = "none"
                 ) -> ModelConfig:
    """`smoke`: the same structure at toy widths, to check the script on a CPU. `prefetch`:
    the network that prefetch needs, which the budget must hold too: "lookahead" adds a
    lookahead router (a 2-token window), "pregate" pre-gate heads of the trainer's default
    width and depth (fitted in the child, fit_pregate)."""
    kw = {**SHAPES[shape], **(SMOKE if smoke else {})}
    cfg = ModelConfig(name=f"{shape}-{layers}L", n_layers=layers, max_seq_len=MAX_SEQ, **kw)
    if prefetch == "lookahead":
        cfg = cfg.replace(lookahead=2)
    if prefetch == "pregate":
        cfg = cfg.replace(pregate=True, pregate_rank=PREGATE_RANK, pregate_depth=PREGATE_DEPTH)
    return cfg


def meta_model(cfg: ModelConfig) -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return Transformer(cfg)
    finally:
        torch.set_default_dtype(default)


def expert_bytes_total(model: Transformer) -> int:
    return sum(p.nbytes for m in model.moe_layers() for p in m.experts.parameters())


def fixed_bytes(model: Transformer, device: torch.device, max_batch: int) -> int:
    """What the engine's plan puts on the device besides the expert cache (`max_batch`
    sequences of MAX_SEQ tokens): non-expert weights + KV cache + activation reserve."""
    kv = SlotKVCache.bytes_per_token(model) * max_batch * MAX_SEQ
    return non_expert_bytes(model) + kv + activation_bytes(model, MAX_SEQ, max_batch, device)


def cache_fraction(shape: str, budget_gib: float, max_batch: int, prefetch: str = "none"
                   ) -> float:
    """Share of all experts the real full-depth model's cache holds at `budget_gib`."""
    model = meta_model(model_config(shape, FULL_LAYERS[shape], prefetch=prefetch))
    return ((budget_gib * GiB - fixed_bytes(model, torch.device("cuda"), max_batch))
            / expert_bytes_total(model))


def scaled_budget(shape: str, layers: int, budget_full: float, smoke: bool,
                  max_batch: int, prefetch: str = "none") -> int:
    """budget_L (module docstring), in bytes."""
    model = meta_model(model_config(shape, layers, smoke, prefetch))
    device = torch.device("cpu" if smoke else "cuda")
    return int(fixed_bytes(model, device, max_batch)
               + cache_fraction(shape, budget_full, max_batch, prefetch)
               * expert_bytes_total(model))


# -- device helpers (children only) ---------------------------------------------------------

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
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return GiB / statistics.median(times[1:])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peak_reserved_bytes() -> int:
    """What the caching allocator took from the GPU: tensors plus its cached, split blocks."""
    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def with_budget(budget: int | None) -> None:
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else budget / total)


def build_model(cfg: ModelConfig) -> Transformer:
    """Random bf16 weights on the device. Re-initialised from seed 0 after construction: the
    constructors of added parts (pre-gate heads, a lookahead router) draw from the RNG, and
    init_parameters sets the backbone's tensors before theirs (registration order), so every
    configuration of a shape serves the same backbone."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(0)
    with torch.no_grad():
        model.reset_parameters()
    return model


def random_batches(vocab: int, shape: tuple[int, int], n: int, seed: int,
                   device: torch.device):
    """`n` batches of `shape` = (sequences, tokens) uniform over the vocabulary, the
    distribution of the benchmark's prompts (and, nearly, of a random model's samples)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(0, vocab, shape, generator=g).to(device)


def fit_pregate(model: Transformer, steps: int, shape: tuple[int, int]) -> dict:
    """Fine-tune `model`'s pre-gate heads on its own routing, the backbone frozen, as `moeflow
    train --pregate` does (moeflow.train.pregate: the heads start at zero-shot's predictions,
    its objective, its held-out recall) but without the trainer, which starts from a checkpoint
    on disk and a tokenized corpus: this model is random and exists only on the device. `steps`
    batches of `shape` (sequences, tokens), seed 1; returns the held-out recall of the heads and
    of zero-shot pre-gating on PREGATE_HELDOUT fresh batches (seed 2; the prompts use seed 0)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    dtype = next(model.pregate.parameters()).dtype
    model.pregate.float()  # fp32 weights for AdamW; the heads compute in fp32 regardless
    model.pregate.init_from_routers([m.router for m in model.moe_layers()])
    freeze_backbone(model)
    params = list(model.pregate.parameters())
    # No weight decay: every step is fresh data from the model the heads are fitted to.
    opt = torch.optim.AdamW(params, lr=PREGATE_LR, betas=(0.9, 0.95), weight_decay=0.0)
    sync()
    t0 = time.perf_counter()
    losses = []
    for step, input_BT in enumerate(random_batches(vocab, shape, steps, 1, device)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, PREGATE_LR, PREGATE_WARMUP, steps, 0.1)
        loss, _ = pregate_objective(model, input_BT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.detach())
    sync()
    train_s = time.perf_counter() - t0
    model.requires_grad_(False)
    del opt, params
    model.pregate.to(dtype)  # served, and counted in the budget, as the model's other weights
    counts = sum(recall_counts(model, input_BT)
                 for input_BT in random_batches(vocab, shape, PREGATE_HELDOUT, 2, device))
    head_hits, zero_hits, routes = counts.tolist()
    return {"steps": steps, "batch": shape[0], "seq": shape[1], "lr": PREGATE_LR,
            "rank": model.config.pregate_rank, "depth": model.config.pregate_depth,
            "tokens": "uniform random", "train_s": train_s,
            "first_loss": losses[0].item() if losses else None,
            "last_loss": losses[-1].item() if losses else None,
            "heldout_sequences": PREGATE_HELDOUT * shape[0],
            "heldout_recall": head_hits / routes, "zero_shot_recall": zero_hits / routes,
            "heads_MB": sum(p.nbytes for p in model.pregate.parameters()) / 1e6}


# -- measuring one engine -------------------------------------------------------------------

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
    cache = dataclasses.asdict(s.cache)
    if s.split:  # the split misses' device shares are copies too (the transfer floor's bytes)
        cache["bytes_copied"] += s.split.bytes_copied
    return {**cache, "pred_needed": s.prefetch.needed,
            "pred_correct": s.prefetch.correct, "pred_predicted": s.prefetch.predicted,
            "cpu_experts": s.cpu.experts if s.cpu else 0, "cpu_rows": s.cpu.rows if s.cpu else 0,
            "split_experts": s.split.experts if s.split else 0,
            "split_cpu_columns": s.split.cpu_columns if s.split else 0,
            "split_columns": s.split.columns if s.split else 0}


def parse_config(config: str) -> dict:
    """'policy/prefetch[/cpu_experts[/expert_store]]' -> OffloadConfig fields (cpu_experts
    default off, expert_store pinned)."""
    parts = config.split("/")
    if len(parts) not in (2, 3, 4):
        raise ValueError("expected policy/prefetch[/cpu_experts[/expert_store]]")
    return dict(zip(("expert_cache_policy", "prefetch", "cpu_experts", "expert_store"), parts))


def delta(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    return {k: after[k] - before[k] for k in after}


def rates(d: dict | None, tokens: int, bandwidth: float, seconds: float) -> dict:
    """Per-token copy figures over `tokens` decoded in `seconds` (module docstring)."""
    if d is None:
        return {}
    floor = d["bytes_copied"] / tokens / bandwidth
    per_token = seconds / tokens
    # Experts computed on the CPU (Fiddler) or split between device and CPU are misses the
    # cache never saw: counted as misses.
    demand = d["lookups"] + d["cpu_experts"] + d["split_experts"]
    return {"hit_rate": d["hits"] / max(demand, 1),
            "cpu_expert_share": d["cpu_experts"] / max(demand, 1),
            "split_share": d["split_experts"] / max(demand, 1),
            "split_cpu_columns": (d["split_cpu_columns"] / d["split_columns"]
                                  if d["split_columns"] else None),
            "pregate_recall": (d["pred_correct"] / d["pred_needed"]) if d["pred_needed"] else None,
            "copied_GB_per_token": d["bytes_copied"] / tokens / 1e9,
            "transfer_floor_ms": 1e3 * floor,
            "x_floor": per_token / floor if floor >= 0.1 * per_token else None,
            "prefetch_skipped": d["prefetch_skipped"]}


def measure(engine: Engine, vocab: int, bandwidth: float, decode_steps: list[list[int]]
            ) -> dict:
    """`decode_steps`: [batch, timed steps] pairs."""
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
    for batch, steps in decode_steps:
        for i in range(batch):  # sampled with a fixed seed per request (module docstring)
            engine.add_request(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=steps + 8, temperature=1.0,
                                              seed=1000 * batch + i))
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
            "steps": steps, **rates(d, steps * batch if d else 1, bandwidth, total)}
        for r in list(engine.scheduler.running):
            engine.abort(r.request_id)
        while engine.has_work():
            engine.step()
    return out


# -- the children: one configuration each, in a fresh process -------------------------------

def child_resident(task: dict) -> dict:
    cfg = model_config(task["shape"], task["layers"], task["smoke"])
    t0 = time.perf_counter()
    model = build_model(cfg)
    reset_peak()
    engine = Engine(model, EngineConfig(max_batch_size=task["max_batch"], max_seq_len=MAX_SEQ))
    build_s = time.perf_counter() - t0
    r = measure(engine, cfg.vocab_size, h2d_bandwidth(), task["decode"])
    return {**r, "peak_GiB": peak_bytes() / GiB, "build_s": build_s}


def child_offload(task: dict) -> dict:
    prefetch = parse_config(task["config"])["prefetch"]
    cfg = model_config(task["shape"], task["layers"], task["smoke"], prefetch)
    bandwidth = h2d_bandwidth()
    budget = scaled_budget(task["shape"], task["layers"], task["budget_full"], task["smoke"],
                           task["max_batch"], prefetch)
    off = OffloadConfig(gpu_memory=str(budget), **parse_config(task["config"]))
    t0 = time.perf_counter()
    model = build_model(cfg)
    experts = expert_bytes_total(model)
    pregate, fit_s = None, 0.0
    if cfg.pregate:
        t1 = time.perf_counter()
        pregate = fit_pregate(model, task["pregate_steps"], tuple(task["pregate_batch"]))
        fit_s = pregate["fit_s"] = time.perf_counter() - t1  # training and held-out scoring
    engine = Engine(model, EngineConfig(max_batch_size=task["max_batch"], max_seq_len=MAX_SEQ,
                                        offload=off))
    build_s = time.perf_counter() - t0 - fit_s
    gc.collect()
    reset_peak()  # the model was built whole on the device; from here on only the plan's parts
    with_budget(budget)
    r = measure(engine, cfg.vocab_size, bandwidth, task["decode"])
    peak, reserved = peak_bytes(), peak_reserved_bytes()
    plan = engine.offload.plan
    return {**r, "budget_GiB": budget / GiB, "full_depth_budget_GiB": task["budget_full"],
            "cache_fraction": plan.slots * plan.expert / experts, "slots": plan.slots,
            "peak_GiB": peak / GiB, "peak_reserved_GiB": reserved / GiB,
            "within_budget": max(peak, reserved) <= budget, "build_s": build_s,
            "h2d_GBps": bandwidth / 1e9, "cpu_expert_costs": cpu_costs(engine),
            "split_two_d_dma": (engine.stats().offload.split.two_d_dma
                                if engine.offload.split is not None else None),
            "store_ratio": store_ratio(engine.offload.cache.store), "pregate_heads": pregate,
            "plan_GiB": {k: v / GiB for k, v in dataclasses.asdict(plan).items()
                         if k not in ("slots", "min_slots")}}


def store_ratio(store) -> float | None:
    """Packed over unpacked host bytes of a packed store; None for the others."""
    return store.total_bytes / store.unpacked_bytes if store.kind == "packed" else None


def cpu_costs(engine: Engine) -> dict | None:
    """The costs the engine measured at start for its CPU-or-copy rule (cpu_experts=auto) or
    its device/CPU share (split), in ms (the dataclass's fields are in seconds: `_s` -> `_ms`);
    for split, the CPU's share of the columns at 1 row and the miss time it predicts."""
    s = engine.stats().offload.cpu
    if s is None or s.costs is None:
        return None
    c = s.costs
    out = {**{k[:-2] + "_ms": 1e3 * v for k, v in dataclasses.asdict(c).items()},
           "cpu_wins_up_to_rows": c.max_rows}
    if engine.offload.split is not None:
        out["split_cpu_share_1row"] = c.copy_s / (c.copy_s + c.cpu_s(1))
        out["split_miss_ms_1row"] = 1e3 * c.copy_s * c.cpu_s(1) / (c.copy_s + c.cpu_s(1))
    return out


def child_peer(task: dict) -> dict:
    budget = scaled_budget("mixtral", task["layers"], task["budget_full"], False,
                           task["max_batch"])
    return run_peer(task["layers"], budget, [])


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
    torch.cuda.empty_cache()
    # accelerate runs a CPU-placed layer by copying its weights to the GPU for the call, so the
    # budget must leave room for streamed layers besides the resident weights, plus activations
    # (a 512-token prefill's logits and attention: well under 1 GiB). Measured on the H200:
    # weights at 90 % of the budget went out of memory at 11.3 of 9.7 GiB; the budget less one
    # layer less 1 GiB went out of memory at 9.4 + 1.75 GiB (a second layer's experts arriving
    # while the first's were held); so two layers' room.
    layer_bytes = max(sum(p.numel() * 2 for p in layer.parameters())
                      for layer in model.model.layers)
    weights_max = int(budget - 2 * layer_bytes - 1 * GiB)
    if weights_max <= 0:
        return {"error": f"budget {budget / GiB:.1f} GiB holds no more than two decoder layers "
                         f"({layer_bytes / GiB:.1f} GiB each) and activations"}
    device_map = infer_auto_device_map(model, max_memory={0: weights_max, "cpu": 400 * GiB},
                                       no_split_module_classes=model._no_split_modules,
                                       dtype=torch.bfloat16)
    on_gpu = sum(1 for v in device_map.values() if v == 0)
    model = dispatch_model(model, device_map=device_map)
    with_budget(budget)
    torch.cuda.reset_peak_memory_stats()
    out = {"transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "budget_GiB": budget / GiB, "weights_max_memory_GiB": weights_max / GiB,
           "largest_layer_GiB": layer_bytes / GiB,
           "modules_on_gpu": on_gpu, "modules": len(device_map)}
    vocab = s["vocab_size"]

    def gen(prompt_len: int, new: int, model=model) -> float:
        ids = torch.randint(0, vocab, (1, prompt_len), device="cuda")
        torch.manual_seed(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0)
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
    return out


def child_main(task_path: str, out_path: str) -> None:
    """Run one task and write its result (or its error and traceback) as JSON to out_path."""
    task = json.loads(Path(task_path).read_text())
    fn = {"resident": child_resident, "offload": child_offload, "peer": child_peer}[task["kind"]]
    t0 = time.perf_counter()
    try:
        result = fn(task)
    except Exception as err:  # noqa: BLE001 - a failed configuration is reported, not fatal
        result = {"error": f"{type(err).__name__}: {err}"[:400],
                  "traceback": traceback.format_exc()}
    result["child_s"] = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps(result))


# -- the parent: tasks, deadline, incremental files -----------------------------------------

def run_child(task: dict, timeout: float, sink: list[str]) -> dict:
    """`task` in a fresh interpreter (own process group, killed whole at `timeout`)."""
    with tempfile.TemporaryDirectory() as tmp:
        task_path, out_path = Path(tmp, "task.json"), Path(tmp, "result.json")
        task_path.write_text(json.dumps(task))
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                                 str(task_path), str(out_path)], start_new_session=True,
                                env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {timeout:.0f} s (global deadline or the "
                             f"cap per configuration)"}
        finally:  # also when the parent itself is stopped: no child outlives it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if not out_path.exists():
            return {"error": f"child exited with status {rc} and no result"}
        result = json.loads(out_path.read_text())
    if "traceback" in result:
        log(result.pop("traceback"), sink)
    return result


def plan_tasks(args) -> list[dict]:
    """In the order they run; the deadline drops the tail, so first each shape's reference and
    its first --core configurations at the smaller budget, then the peer, then the other
    configurations, then the larger budgets."""
    layers = {"mixtral": args.mixtral_layers, "qwen3": args.qwen3_layers}
    decode = [[b, n] for b, n in ((1, args.decode_b1_steps), (16, args.decode_b16_steps))
              if b <= args.max_batch]  # JSON: no int keys
    base = dict(smoke=args.smoke, decode=decode, max_batch=args.max_batch,
                pregate_steps=args.pregate_steps,
                pregate_batch=PREGATE_SMOKE_BATCH if args.smoke else PREGATE_BATCH)
    chosen = {"small": slice(0, 1), "large": slice(1, 2), "all": slice(0, 2)}[args.budgets]
    budgets = {s: BUDGETS_GIB[s][chosen] for s in args.shapes}

    def offload(shape: str, budget_full: int, config: str) -> dict:
        return dict(base, kind="offload", shape=shape, layers=layers[shape],
                    budget_full=budget_full, config=config, name=f"{budget_full}GiB/{config}")
    peer = dict(base, kind="peer", shape="mixtral", layers=layers["mixtral"],
                budget_full=BUDGETS_GIB["mixtral"][0], name="peer")
    if args.peer_only:
        return [peer]
    tasks = []
    for shape in args.shapes:
        if not args.no_resident:
            tasks.append(dict(base, kind="resident", shape=shape, layers=layers[shape],
                              name="all_on_gpu"))
        tasks += [offload(shape, budgets[shape][0], c) for c in args.configs[:args.core]]
    if "mixtral" in args.shapes and not args.no_peer and not args.smoke:
        tasks.append(peer)
    for shape in args.shapes:
        tasks += [offload(shape, budgets[shape][0], c) for c in args.configs[args.core:]]
    for shape in args.shapes:
        for budget_full in budgets[shape][1:]:
            tasks += [offload(shape, budget_full, c) for c in args.configs]
    return tasks


def table(results: dict) -> str:
    lines = ["| shape | config | budget GiB (full-depth) | peak GiB (reserved) | "
             "prefill 512 tok/s | decode b1 tok/s | b1 hit | b1 recall | b1 on CPU | "
             "b1 split (CPU cols) | b1 GB copied/token | b1 × floor | decode b16 tok/s | "
             "b16 hit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)
    for shape, res in results["shapes"].items():
        for name, r in res["runs"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {shape} | {name} | {r.get('error', r.get('skipped'))[:90]} |")
                continue
            b1 = r["decode_b1"]
            b16 = r.get("decode_b16", {"tokens_per_s": float("nan")})
            budget = (f"{r['budget_GiB']:.1f} ({r['full_depth_budget_GiB']})"
                      if "budget_GiB" in r else "-")
            lines.append(
                f"| {shape} | {name} | {budget} | {f(r.get('peak_GiB'))} "
                f"({f(r.get('peak_reserved_GiB'))}) | "
                f"{r['prefill_512_tokens_per_s']:.0f} | {b1['tokens_per_s']:.2f} | "
                f"{f(b1.get('hit_rate'))} | {f(b1.get('pregate_recall'))} | "
                f"{f(b1.get('cpu_expert_share'))} | {f(b1.get('split_share'))} "
                f"({f(b1.get('split_cpu_columns'))}) | "
                f"{f(b1.get('copied_GB_per_token'), '{:.3f}')} | {f(b1.get('x_floor'))} | "
                f"{b16['tokens_per_s']:.1f} | {f(b16.get('hit_rate'))} |")
    for shape, res in results["shapes"].items():
        for name, r in res["runs"].items():
            h = r.get("pregate_heads")
            if h:
                lines.append("")
                lines.append(
                    f"{shape} {name}: heads (width {h['rank']}, {h['depth']} hidden layers) "
                    f"fitted {h['steps']} steps of {h['batch']} x {h['seq']} {h['tokens']} "
                    f"tokens in {h['train_s']:.1f} s (loss {f(h['first_loss'], '{:.3f}')} -> "
                    f"{f(h['last_loss'], '{:.3f}')}); held-out recall (teacher-forced, "
                    f"{h['heldout_sequences']} fresh sequences) {h['heldout_recall']:.3f}, "
                    f"zero-shot on the same {h['zero_shot_recall']:.3f}")
    peer = results.get("peer")
    if peer:
        lines.append("")
        lines.append(f"peer (transformers + accelerate, mixtral shape): {json.dumps(peer)}")
    lines.append("")
    lines.append(f"{results['gpu']}, {results['date']}, torch {results['torch']}, pinned "
                 f"host->device {f(results.get('h2d_GBps'), '{:.1f}')} GB/s, "
                 f"wall {results.get('wall_s', 0):.0f} s; `{results['command']}`")
    return "\n".join(lines)


def write(out: Path, results: dict, sink: list[str]) -> None:
    results["wall_s"] = time.monotonic() - T0
    bw = [r["h2d_GBps"] for s in results["shapes"].values() for r in s["runs"].values()
          if "h2d_GBps" in r]
    results["h2d_GBps"] = statistics.median(bw) if bw else None
    (out / "offload.json").write_text(json.dumps(results, indent=2))
    (out / "offload.md").write_text(table(results) + "\n")
    (out / "offload.log").write_text("\n".join(sink) + "\n")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help="offloaded configurations, policy/prefetch[/cpu_experts[/expert_store]] "
                        "(cpu_experts: off (default), auto, always or split)")
    p.add_argument("--core", type=int, default=4,
                   help="how many of --configs run per shape before the peer and the rest")
    p.add_argument("--budgets", choices=("small", "large", "all"), default="small",
                   help="the smaller full-depth budget per shape, the larger, or both")
    p.add_argument("--mixtral-layers", type=int, default=12)
    p.add_argument("--qwen3-layers", type=int, default=16)
    p.add_argument("--decode-b1-steps", type=int, default=16)
    p.add_argument("--decode-b16-steps", type=int, default=4)
    p.add_argument("--deadline-s", type=float, default=420,
                   help="from this script's start: configurations that cannot start with "
                        f"{MIN_CHILD_S} s left are skipped, a running one is killed")
    p.add_argument("--child-cap-s", type=float, default=CHILD_CAP_S,
                   help="seconds one configuration may take (full-depth Mixtral builds ~80 s)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="the engine's max_batch_size, which sizes its KV cache and activation "
                        "reserve; below 16 the batch-16 decode is not measured (a batch-1 "
                        "server configured as one leaves more of the budget to the cache)")
    p.add_argument("--pregate-steps", type=int, default=PREGATE_STEPS,
                   help="optimizer steps that fit the pre-gate heads of a policy/pregate "
                        "configuration ({} x {} random tokens each)".format(*PREGATE_BATCH))
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-resident", action="store_true",
                   help="skip the all-on-GPU reference (full depth: measured in an earlier run)")
    p.add_argument("--peer-only", action="store_true",
                   help="only the transformers + accelerate peer (Mixtral shape)")
    p.add_argument("--smoke", action="store_true",
                   help="toy widths on the CPU: checks the script, measures nothing")
    args = p.parse_args()
    # SIGTERM (a job's time limit) unwinds like Ctrl-C, so run_child kills the running child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.pregate_steps < 0:
        p.error(f"--pregate-steps {args.pregate_steps}: must be 0 (the heads stay at zero-shot's "
                f"predictions) or more")
    for c in args.configs:
        try:
            OffloadConfig(gpu_memory="1GiB", **parse_config(c))
        except ValueError as err:
            p.error(f"--configs {c}: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sink: list[str] = []
    # The parent never touches the device: every CUDA context is a child's.
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        p.error("needs a CUDA device (or --smoke to check the script on the CPU)")
    name = "cpu (smoke)"
    if cuda:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                               "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip().splitlines()[0]
    results = {"gpu": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "torch": torch.__version__, "deadline_s": args.deadline_s,
               "command": "PYTHONPATH=. python benchmarks/offload.py " + " ".join(
                   f"--{k.replace('_', '-')}" + ("" if v is True else
                                                 f" {' '.join(v) if isinstance(v, list) else v}")
                   for k, v in vars(args).items() if k != "out" and v is not False),
               "shapes": {}, "peer": None}
    for shape in args.shapes:
        layers = {"mixtral": args.mixtral_layers, "qwen3": args.qwen3_layers}[shape]
        cfg, full = model_config(shape, layers), model_config(shape, FULL_LAYERS[shape])
        e_L, e_full = expert_bytes_total(meta_model(cfg)), expert_bytes_total(meta_model(full))
        o_L, o_full = non_expert_bytes(meta_model(cfg)), non_expert_bytes(meta_model(full))
        results["shapes"][shape] = {"layers": layers, "full_layers": FULL_LAYERS[shape],
                                    "expert_GB": e_L / 1e9, "non_expert_GB": o_L / 1e9,
                                    "full_depth_GB": (e_full + o_full) / 1e9, "runs": {}}
        log(f"{shape}: {layers} layers, experts {e_L / GiB:.1f} GiB + other {o_L / GiB:.1f} "
            f"GiB (full depth {(e_full + o_full) / GiB:.1f} GiB)", sink)
    for task in plan_tasks(args):
        left = args.deadline_s - (time.monotonic() - T0)
        if left < MIN_CHILD_S:
            r = {"skipped": f"skipped: {left:.0f} s left of the {args.deadline_s:.0f} s deadline"}
        else:
            log(f"{task['shape']} {task['name']}: starting ({left:.0f} s left)", sink)
            r = run_child(task, min(left - 5, args.child_cap_s), sink)
        log(f"{task['shape']} {task['name']}: {json.dumps(r)}", sink)
        if task["kind"] == "peer":
            results["peer"] = r
        else:
            results["shapes"][task["shape"]]["runs"][task["name"]] = r
        write(out, results, sink)
    write(out, results, sink)
    print(table(results))


if __name__ == "__main__":
    main()
