"""Placing a model under a GPU-memory budget: experts to host memory, the rest to the device.

`offload_experts(model, config, kv_cache_bytes, max_tokens)` is what the engine calls when
`EngineConfig.offload` is set. It takes the model over (the one case where the engine changes
the model it is given: it must, the model does not fit otherwise): each MoE layer's `Experts`
is replaced by an `OffloadedExperts` reading from one shared `ExpertCache`, the experts' weights
move to an `ExpertStore` in (pinned) host memory one layer at a time (or a PackedExpertStore,
packed to 12 bits per weight, with expert_store="packed"), and everything else moves to the
device. Load the model on the CPU first (`moeflow serve/generate --gpu-memory` do): a
model larger than the GPU never touches it whole.

With expert_store="mmap" the model must come from `load_model(DIR, map_experts=True)`: its MoE
layers hold `MappedExperts` (views of the checkpoint's files), which go to a MappedExpertStore
as they are, nothing read. A model whose experts are in memory (an nn.Module built or loaded
whole) is refused in one line rather than written to disk behind the caller's back: its
experts already take the RAM that mmap would spare, and where to put a second copy of the
weights, and when to delete it, is the caller's decision (`write_weights`, then load mapped).
A mapped model under expert_store="pinned" gets its experts read into the pinned store, one
layer at a time.

The budget is checked before anything moves, so a budget that is too small fails with one line
naming the needed and the given sizes and leaves the model as it was.

Activation reserve: the largest forward the engine runs is one prompt of up to `max_tokens`
(prefill) or a decode step of the whole batch; `activation_bytes` bounds its live tensors from
the config (hidden states, attention scores where materialised, expert rows, logits), doubled for
the caching allocator's rounding, plus on CUDA ALLOCATOR_SLACK for the free pieces the caching
allocator holds that a larger request cannot use. The GPU benchmark measures the peak
(`torch.cuda.max_memory_allocated` and `max_memory_reserved`) against the budget to check this
bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.checkpoint.mapped import MappedExperts
from moeflow.infer.device import resolve_device
from moeflow.infer.offload.column_copy import two_d_dma
from moeflow.infer.offload.config import BudgetPlan, OffloadConfig, plan_budget
from moeflow.infer.offload.cpu_experts import CpuExperts, CpuExpertStats, measure_costs
from moeflow.infer.offload.expert_cache import CacheStats, ExpertCache
from moeflow.infer.offload.expert_store import ExpertStore, LayerExperts, expert_bytes
from moeflow.infer.offload.mapped_store import MappedExpertStore, template
from moeflow.infer.offload.offloaded_experts import OffloadedExperts
from moeflow.infer.offload.packed_store import PackedExpertStore
from moeflow.infer.offload.packed_store import staging_bytes as packed_staging_bytes
from moeflow.infer.offload.prefetch import (LookaheadPrefetch, PregatePredictor,
                                            PrefetchLedger, PrefetchStats, RouterPredictor)
from moeflow.infer.offload.split_experts import SplitExperts, SplitStats
from moeflow.ops.activation import ffn_in_width


@dataclass(frozen=True)
class OffloadStats:
    plan: BudgetPlan
    cache: CacheStats  # lookups: experts computed on the device (CPU-computed ones are in `cpu`)
    prefetch: PrefetchStats
    cpu: CpuExpertStats | None = None  # misses computed on the CPU, if cpu_experts is not "off"
    split: SplitStats | None = None  # misses split between device and CPU (cpu_experts="split")


def _layer_experts(experts) -> LayerExperts:
    if isinstance(experts, MappedExperts):  # shapes and dtype only: nothing is read here
        return template(experts)
    return LayerExperts(experts.w_in_EDI, experts.w_out_EFD, experts.b_in_EI, experts.b_out_ED)


def _read_mapped(experts: MappedExperts) -> tuple[torch.Tensor | None, ...]:
    """A mapped layer's experts read into memory, stacked [E, ...] in the served dtype."""
    return tuple(None if ts[0] is None else torch.stack(ts).to(experts.dtype)
                 for ts in zip(*experts.experts))


def _check_store(model: torch.nn.Module, config: OffloadConfig, reuse) -> None:
    """One line for a model whose experts cannot be served from the store asked for."""
    if reuse is not None:
        if reuse.kind != config.expert_store:
            raise ValueError(f"expert_store={config.expert_store!r}: an earlier engine already "
                             f"moved this model's experts to a {reuse.kind!r} store")
        return
    mapped = isinstance(model.moe_layers()[0].experts, MappedExperts)
    if config.expert_store == "mmap" and not mapped:
        raise ValueError("expert_store='mmap': the model's experts are in memory, not mapped "
                         "from a checkpoint; load it with moeflow.checkpoint.load_model(DIR, "
                         "map_experts=True) (serve/generate --model DIR --expert-store mmap "
                         "do), or save it first with moeflow.checkpoint.write_weights")


def non_expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer outside the MoE layers' experts (tied ones once)."""
    skip = {id(t) for layer in model.moe_layers() for t in layer.experts.parameters()}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# Measured on the H200 (benchmarks/results/offload, Mixtral shape at full depth, 24 GiB,
# expandable segments): 0.62-0.63 GiB reserved but free at the peak, in two runs; a plan that
# left 0.02 GiB beyond the doubled activations went out of memory in its first prefill.
ALLOCATOR_SLACK = 640 << 20


def activation_bytes(model: torch.nn.Module, max_tokens: int, max_batch: int,
                     device: torch.device) -> int:
    """Upper bound on the live activations of one engine forward (see the module docstring)."""
    c = model.config
    elt = next(model.parameters()).element_size()
    T = max(max_tokens, max_batch)
    moe = model.moe_layers()
    K = max((m.spec.router.top_k for m in moe), default=1)
    E = max((m.spec.num_experts for m in moe), default=1)
    activation = "gelu" if c.arch == "gpt" else "swiglu"
    F = max([s.d_ff for s in c.ffn_specs()] + [s.expert_d_ff for s in c.ffn_specs()])
    per_token = (12 * c.d_model + 3 * c.n_heads * c.head_dim  # residual, norms, q/k/v/o
                 + K * (4 * c.d_model + ffn_in_width(activation, F) + F)) * elt  # expert rows
    per_token += 4 * E * 4  # fp32 router logits, scores, sort keys
    # Attention scores: CUDA prefill runs flash attention (causal, from position 0: no mask);
    # the CPU's math path materialises them.
    scores = 0 if device.type == "cuda" else T * T * c.n_heads * 4
    logits = 2 * max_batch * c.vocab_size * 4
    slack = ALLOCATOR_SLACK if device.type == "cuda" else 0
    return 2 * (T * per_token + scores + logits) + slack


class ExpertOffload:
    """The engine's handle on an offloaded model: its budget plan, cache and statistics."""

    def __init__(self, plan: BudgetPlan, cache: ExpertCache, ledger: PrefetchLedger,
                 device: torch.device, cpu: CpuExperts | None = None,
                 split: SplitExperts | None = None, lookahead: LookaheadPrefetch | None = None
                 ) -> None:
        self.plan, self.cache, self.ledger, self.device = plan, cache, ledger, device
        self.cpu, self.split, self.lookahead = cpu, split, lookahead

    def before_decode(self, model: torch.nn.Module, tokens_B1: torch.Tensor,
                      history_BH: torch.Tensor) -> None:
        """Start of a decode step: with prefetch="lookahead", issue the step's experts of every
        layer (moeflow.infer.offload.prefetch.LookaheadPrefetch); otherwise nothing."""
        if self.lookahead is not None:
            self.lookahead.plan(model.lookahead_routing(tokens_B1, history_BH))

    def stats(self) -> OffloadStats:
        split = None
        if self.split is not None:
            split = self.split.stats(self.device.type == "cuda" and two_d_dma())
        return OffloadStats(self.plan, self.cache.stats(), self.ledger.stats(),
                            None if self.cpu is None else self.cpu.stats(), split)


def _host_layers(model: torch.nn.Module) -> tuple[list[LayerExperts], ExpertStore | None]:
    """Each MoE layer's expert tensors, and the host store if an earlier engine offloaded them
    (a new engine then builds a new cache over that store instead of copying the experts)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("gpu_memory: the model has no MoE layer, there are no experts to "
                         "offload")
    offloaded = [isinstance(m.experts, OffloadedExperts) for m in layers]
    if any(offloaded) and not all(offloaded):
        raise ValueError("gpu_memory: some MoE layers are offloaded and some are not")
    mapped = [isinstance(m.experts, MappedExperts) for m in layers]
    if any(mapped) and not all(mapped):
        raise ValueError("gpu_memory: some MoE layers' experts are memory-mapped and some not")
    if all(offloaded):
        store = layers[0].experts.cache.store
        return store.templates, store
    return [_layer_experts(m.experts) for m in layers], None


def plan_offload(model: torch.nn.Module, config: OffloadConfig, kv_cache_bytes: int,
                 max_tokens: int, max_batch: int) -> BudgetPlan:
    """The budget plan `offload_experts` would use; changes and allocates nothing."""
    device = resolve_device(config.device)
    sources, _ = _host_layers(model)
    shapes = [(t.shape[1:], t.dtype) for t in sources[0].tensors()]
    for i, src in enumerate(sources):
        if [(t.shape[1:], t.dtype) for t in src.tensors()] != shapes:
            raise ValueError(f"gpu_memory: MoE layer {i}'s expert shapes differ from the first "
                             f"MoE layer's; the expert cache needs one expert shape")
    if config.expert_store == "packed" and sources[0].w_in_EDI.dtype != torch.bfloat16:
        raise ValueError(f"expert_store='packed': packs bfloat16 experts; this model's are "
                         f"{sources[0].w_in_EDI.dtype} (serve it in bfloat16, or use "
                         f"expert_store 'pinned')")
    staging = 0
    if config.cpu_experts == "split":
        staging = expert_bytes(sources[0])
    elif config.expert_store == "packed":  # counted on the CPU too, where it is not allocated
        staging = packed_staging_bytes(sources[0])
    layers = model.moe_layers()
    return plan_budget(config.budget_bytes, non_expert=non_expert_bytes(model),
                       kv_cache=kv_cache_bytes,
                       activations=activation_bytes(model, max_tokens, max_batch, device),
                       expert=expert_bytes(sources[0]),
                       min_slots=max(m.spec.router.top_k for m in layers),
                       total_experts=sum(m.spec.num_experts for m in layers),
                       staging=staging)


def offload_experts(model: torch.nn.Module, config: OffloadConfig, kv_cache_bytes: int,
                    max_tokens: int, max_batch: int) -> ExpertOffload:
    """Take `model` over as described in the module docstring; ValueError if the budget is
    below the non-expert weights + KV cache + activations + a minimal expert cache."""
    plan = plan_offload(model, config, kv_cache_bytes, max_tokens, max_batch)
    if config.prefetch == "pregate" and model.pregate is None:
        raise ValueError("prefetch='pregate': the model has no pre-gate heads; fine-tune them "
                         "with `moeflow train --pregate --init CHECKPOINT`")
    if config.prefetch == "lookahead" and model.lookahead is None:
        raise ValueError("prefetch='lookahead': the model has no lookahead router; give it one "
                         "with `moeflow train --lookahead --init CHECKPOINT`")
    device = resolve_device(config.device)
    layers = model.moe_layers()
    sources, reuse = _host_layers(model)
    _check_store(model, config, reuse)
    if reuse is not None:
        store = reuse
    elif config.expert_store == "mmap":
        store = MappedExpertStore(device)
    elif config.expert_store == "packed":
        store = PackedExpertStore(device, sources[0])
    else:
        store = ExpertStore(pin=device.type == "cuda")
    cache = ExpertCache(store, sources[0], plan.slots, device, config.expert_cache_policy)
    del sources  # they hold the layers' weights: drop them so they go with each layer's module
    ledger = PrefetchLedger()
    lookahead = LookaheadPrefetch(cache, ledger) if config.prefetch == "lookahead" else None
    cpu = split = None
    for i, layer in enumerate(layers):
        old = layer.experts
        if reuse is None and isinstance(store, MappedExpertStore):
            store.add_layer(old)
        elif reuse is None:
            store.add_layer(*(_read_mapped(old) if isinstance(old, MappedExperts) else
                              (old.w_in_EDI, old.w_out_EFD, old.b_in_EI, old.b_out_ED)))
        if i == 0 and config.cpu_experts != "off":  # layer 0 is stored: measure with it
            costs = None
            if config.cpu_experts in ("auto", "split"):  # slot 0 is empty until first used
                costs = measure_costs(store, old.activation, lambda: cache.copy_into(0, (0, 0)),
                                      device)
            cpu = CpuExperts(store, old.activation, config.cpu_experts, costs)
            if config.cpu_experts == "split":
                split = SplitExperts(store, old.activation, costs, device,
                                     cache.streams.copy if device.type == "cuda" else None,
                                     old.backends)
        predictor = None
        if config.prefetch == "router" and i + 1 < len(layers):
            predictor = RouterPredictor(layers[i + 1].router)
        elif config.prefetch == "pregate" and i + 1 < len(layers):
            predictor = PregatePredictor(model.pregate, i)
        layer.experts = OffloadedExperts(i, old.num_experts, old.d_model, old.d_ff,
                                         old.activation, cache, ledger, old.backends,
                                         predictor, cpu, split, lookahead)
        del old  # the layer held the only reference: its weights are freed here
    model.to(device)
    return ExpertOffload(plan, cache, ledger, device, cpu, split, lookahead)
