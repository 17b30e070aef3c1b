"""How the engine offloads experts: the frozen `OffloadConfig` and the GPU-memory budget plan.

`moeflow serve --gpu-memory 24GiB`, `moeflow generate --gpu-memory 24GiB` and
`EngineConfig(offload=OffloadConfig(gpu_memory="24GiB"))` all build this one dataclass (the
flags are generated from its fields). The budget covers everything the engine allocates on the
GPU: non-expert weights, the KV cache, an activation reserve for the largest forward the engine
runs, and the expert cache, whose slot count is what is left divided by one expert's bytes.

Minimal cache: `max top_k` slots, one token's experts of one MoE layer. With fewer, a decode step
at batch 1 could not hold the experts it computes with at once. Larger batches and prefill need
more distinct experts than that; the layer then computes them in groups of at most the slot
count (moeflow.infer.offload.offloaded_experts), so any budget at or above the minimum runs every
request, only slower. Prefetching needs slots beyond those the current layer uses: with the
minimum it finds none and is skipped (counted in the statistics).

Eviction policy ("lru", "lfu" or "cyclic", see moeflow.infer.offload.expert_cache) and the
prefetch method ("none"; "router": zero-shot pre-gating with the next layer's router;
"pregate": the model's fine-tuned pre-gate heads, `moeflow train --pregate`; "lookahead": every
layer's experts of a decode step at its start, from a model with a lookahead router, `moeflow
train --lookahead`) and whether misses
may compute on the CPU (`cpu_experts`, moeflow.infer.offload.cpu_experts; "split": the device
and the CPU share a missed expert, moeflow.infer.offload.split_experts, whose staging buffer of
one expert comes out of the budget) are chosen here too.

Where the experts live (`expert_store`): "pinned", a page-locked host copy (host RAM must hold
every expert); "packed", the same packed losslessly to 12 bits per bf16 weight, so a miss
copies 3/4 of the bytes, through a device staging buffer of one packed expert that comes out of
the budget (moeflow.infer.offload.packed_store); or "mmap", views of the checkpoint's files that
the kernel pages in on a miss (moeflow.infer.offload.mapped_store; for models larger than host
RAM: the model must come from `load_model(DIR, map_experts=True)`, which `--expert-store mmap`
does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeflow.validate import check, choice, option

CPU_EXPERTS = ("off", "auto", "always", "split")
POLICIES = ("lru", "lfu", "cyclic")
PREFETCH = ("none", "router", "pregate", "lookahead")
EXPERT_STORES = ("pinned", "mmap", "packed")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from '24GiB', '24GB' (10^9), '1.5g', '4096' or an int; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"gpu_memory={text!r}: must be a size such as 24GiB, 24GB or "
                             f"25769803776")
        value = int(float(m.group(1)) * _UNITS[unit])
    check(value > 0, "gpu_memory", text, "must be a positive size")
    return value


def format_size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 10 << 20 else f"{n:,} bytes"


@dataclass(frozen=True)
class OffloadConfig:
    gpu_memory: str = option("GPU memory budget (e.g. 24GiB, 40GB): experts stay in pinned CPU "
                             "memory and a GPU expert cache fills what the non-expert weights "
                             "and KV cache leave")
    # cyclic by default: it hit most in every case of benchmarks/results/offload/replay.md
    # (trained and random routing, batch 1 and 16; LRU hits 0 at batch 16 there), and was the
    # fastest at batch 16 on the H200 (results/offload/README.md). LFU was faster at batch 1
    # there, on random weights whose routing concentrates on few experts.
    expert_cache_policy: str = option("which cached expert to evict (cyclic: from the layer "
                                      "whose turn comes last)", choices=POLICIES,
                                      default="cyclic")
    # none by default: zero-shot pre-gating was the slowest offloaded setting at batch 1 on the
    # H200 for both the Mixtral and the Qwen3 shape (its wrong guesses are copies too); the
    # trained heads (pregate) have no GPU measurement yet.
    prefetch: str = option("predict the next MoE layer's experts while this one computes "
                           "(router: apply the next layer's router to this layer's input; "
                           "pregate: the model's fine-tuned pre-gate heads, see train --pregate; "
                           "lookahead: all layers' experts at the step's start, from a model "
                           "with a lookahead router, see train --lookahead)",
                           choices=PREFETCH, default="none")
    # off by default until the GPU benchmark has measured it (benchmarks/offload.py, "+cpu" rows).
    cpu_experts: str = option("compute a missed expert on the CPU from its host copy when that is "
                              "faster than copying it (auto: from copy and CPU rates measured at "
                              "start; always: every miss, for benchmarks; split: the device and "
                              "the CPU each compute a share of a missed expert's columns at "
                              "once)", choices=CPU_EXPERTS,
                              default="off")
    # pinned by default: it copies without the CPU in the loop; mmap is for models whose
    # experts do not fit host RAM (each miss pages the expert in through the CPU).
    expert_store: str = option("where the experts live (pinned: a page-locked copy in host "
                               "RAM; packed: the same packed losslessly to 12 bits per bf16 "
                               "weight, 3/4 of the bytes per miss; mmap: memory-mapped from the "
                               "checkpoint's files, paged in on a miss, for models larger than "
                               "host RAM)", choices=EXPERT_STORES, default="pinned")
    device: str = "auto"  # compute device: no flag of its own, the command's --device sets it

    def __post_init__(self) -> None:
        parse_size(self.gpu_memory)
        choice("expert_cache_policy", self.expert_cache_policy, POLICIES)
        choice("prefetch", self.prefetch, PREFETCH)
        choice("cpu_experts", self.cpu_experts, CPU_EXPERTS)
        choice("device", self.device, ("auto", "cpu", "cuda"))
        choice("expert_store", self.expert_store, EXPERT_STORES)
        if self.expert_store != "pinned" and self.cpu_experts == "split":
            raise ValueError(f"cpu_experts='split' with expert_store={self.expert_store!r}: "
                             f"the split's 2D DMA copies columns of unpacked pinned experts; "
                             f"use cpu_experts auto, always or off with {self.expert_store}")

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.gpu_memory)


@dataclass(frozen=True)
class BudgetPlan:
    """What the budget buys; every figure in bytes except `slots`."""

    budget: int
    non_expert: int  # weights that stay on the device (attention, norms, routers, embeddings)
    kv_cache: int
    activations: int  # reserve for the largest forward (prefill of max_seq_len tokens)
    expert: int  # one expert's weights (all projections and biases)
    min_slots: int
    slots: int
    staging: int = 0  # the device share of a split miss (cpu_experts="split"): one expert;
    # or expert_store="packed"'s staging buffer: one packed expert

    @property
    def fixed(self) -> int:
        return self.non_expert + self.kv_cache + self.activations + self.staging

    @property
    def cache(self) -> int:
        return self.slots * self.expert


def plan_budget(budget: int, non_expert: int, kv_cache: int, activations: int, expert: int,
                min_slots: int, total_experts: int, staging: int = 0) -> BudgetPlan:
    """Slots = (budget - fixed) // expert, at most every expert; ValueError below the minimum."""
    fixed = non_expert + kv_cache + activations + staging
    need = fixed + min_slots * expert
    if budget < need:
        what = "non-expert weights + KV cache + activations" + (
            " + staging" if staging else "")
        raise ValueError(
            f"gpu_memory={format_size(budget)}: below the {format_size(need)} needed for the "
            f"{what} ({format_size(fixed)}) and a minimal expert cache of {min_slots} experts "
            f"({format_size(min_slots * expert)})")
    slots = min((budget - fixed) // expert, total_experts)
    return BudgetPlan(budget=budget, non_expert=non_expert, kv_cache=kv_cache,
                      activations=activations, expert=expert, min_slots=min_slots, slots=slots,
                      staging=staging)
