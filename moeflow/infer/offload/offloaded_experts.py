"""The experts module the offloading engine puts in place of each MoE layer's `Experts`.

Same call as moeflow.model.experts.Experts — (x_ND, ends_E, parked) -> y_ND over expert-sorted
rows — so MoELayer's router → dispatch → experts → combine is untouched. It holds no weights:
it asks the shared ExpertCache for slots holding the experts its rows need, sorts the rows by
slot and runs the same expert kernel (moeflow.ops, chosen by the model's Backends) on the cache's
pool tensors. Rows keep their order within an expert, so each expert's matmuls see exactly the
inputs of the resident path: outputs are equal, not just close (tests check bitwise on CPU).

Per forward, in order:
  1. one host sync reads the expert boundaries and, if a predictor is set, the predicted
     experts of the next MoE layer (both in one transfer); it is the only one: the slot
     boundaries and row indices go to the device from pinned memory without a sync (a
     blocking `.to(cuda)` would wait for the whole stream, this group's expert copies
     included, and the host would queue the rest of the layer and the next layer's attention
     only after the copies: measured on the H200 as ~3.5 ms of host time per layer on top of
     the transfer floor, 165 vs 119 ms per token);
  2. needed experts are acquired (misses copied on the copy stream), resident ones first, in
     groups of at most the slot count when the layer needs more experts than there are slots;
  3. before the last group computes, the next layer's predicted experts are prefetched, so
     their copies overlap this layer's compute and the next layer's attention;
  4. the compute stream waits for the copies into this group's slots only, computes, and
     marks the slots free for eviction once those kernels finish; then, with `lookahead`
     (moeflow.infer.offload.prefetch.LookaheadPrefetch), the step's experts of later layers
     that did not fit at the step's start are issued, into slots that include this layer's
     (the copies wait for its kernels, not the host);
  5. with `cpu` (moeflow.infer.offload.cpu_experts), missed experts whose few rows the CPU
     computes faster than their copy would take are not acquired: their rows go to the host
     before step 2 queues any kernel, are computed there while the device runs the others, and
     come back into y_ND. CPU float math differs from the device's in rounding only;
  6. with `split` (moeflow.infer.offload.split_experts), misses that find no free slot are
     split along d_ff: the CPU worker starts on its shares first, the device shares are copied
     back to back and computed as they land, and the CPU partials are added at the end.

Legend: N rows, D model dim, E experts of this layer, S cache slots, K top-k.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from moeflow.infer.offload.cpu_experts import CpuExperts
from moeflow.infer.offload.expert_cache import ExpertCache
from moeflow.infer.offload.prefetch import LookaheadPrefetch, Predictor, PrefetchLedger
from moeflow.infer.offload.split_experts import SplitExperts, host_to_device
from moeflow.infer.offload.streams import to_device_async
from moeflow.ops.backend import Backends, ChoosesBackends, resolve_expert_backend


class OffloadedExperts(nn.Module, ChoosesBackends):
    def __init__(self, layer: int, num_experts: int, d_model: int, d_ff: int, activation: str,
                 cache: ExpertCache, ledger: PrefetchLedger, backends: Backends = Backends(),
                 predictor: Predictor | None = None, cpu: CpuExperts | None = None,
                 split: SplitExperts | None = None,
                 lookahead: LookaheadPrefetch | None = None) -> None:
        super().__init__()
        self.layer, self.num_experts = layer, num_experts
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.backends = backends
        self.cache, self.ledger, self.predictor, self.cpu = cache, ledger, predictor, cpu
        self.split, self.lookahead = split, lookahead

    def forward(self, x_ND: torch.Tensor, ends_E: torch.Tensor, parked: bool = True
                ) -> torch.Tensor:
        E, cache = self.num_experts, self.cache
        parts = [ends_E.to(torch.int64)]
        if self.predictor is not None:
            parts.append(self.predictor(x_ND).reshape(-1).to(torch.int64))
        host = torch.cat(parts).tolist()  # the one host sync of this layer
        ends = host[:E]
        starts = [0] + ends[:-1]
        needed = [e for e in range(E) if ends[e] > starts[e]]
        self.ledger.score(self.layer, set(needed))
        predicted = sorted(set(host[E:])) if self.predictor is not None else []
        if predicted:
            self.ledger.predict(self.layer + 1, set(predicted))

        y_ND = x_ND.new_zeros(x_ND.shape[0], cache.w_out_SFD.shape[-1])
        resident = cache.resident(self.layer)
        missed = [e for e in needed if e not in resident]
        on_cpu = [e for e in missed if self.cpu is not None
                  and self.cpu.prefers_cpu(ends[e] - starts[e])]
        split = {}  # expert -> Fg, the columns the device computes
        if self.split is not None and not cache.has_empty_slot:
            for e in missed:
                Fg = self.split.columns_for(ends[e] - starts[e])
                if 0 < Fg < self.d_ff:
                    split[e] = Fg
        host_experts = on_cpu + list(split)
        if host_experts:  # rows to the host before the device queues more work behind them
            x_host_RD = torch.cat([x_ND[starts[e]:ends[e]] for e in host_experts]).to("cpu")
            at, host_rows = 0, {}
            for e in host_experts:
                host_rows[e] = x_host_RD[at:at + ends[e] - starts[e]]
                at += ends[e] - starts[e]
        if split:  # the CPU starts on its shares now, while this thread queues device work
            pending = self.split.start_cpu(self.layer, [(e, Fg, host_rows[e])
                                                         for e, Fg in split.items()])
            for e, Fg in split.items():  # copies back to back on the copy stream
                y_ND[starts[e]:ends[e]] = self.split.device_share(
                    self.layer, e, Fg, x_ND[starts[e]:ends[e]])
        order = sorted((e for e in needed if e not in on_cpu and e not in split),
                       key=lambda e: e not in resident)  # hits compute first
        groups = [order[i:i + cache.num_slots] for i in range(0, len(order), cache.num_slots)]
        for g, group in enumerate(groups):
            slots = cache.acquire(self.layer, group)
            if g == len(groups) - 1 and predicted:
                cache.prefetch(self.layer + 1, predicted)
            cache.streams.wait_ready(slots)
            self._compute(x_ND, y_ND, group, slots, starts, ends)
            cache.release(slots)
            if g == len(groups) - 1 and self.lookahead is not None:
                # After the release: this layer's slots are then spare for the later layers
                # (their copies still wait for the compute that reads them, streams.py).
                self.lookahead.refill(self.layer)
        if not groups and predicted:
            cache.prefetch(self.layer + 1, predicted)
        if not groups and self.lookahead is not None:
            self.lookahead.refill(self.layer)
        for e in on_cpu:  # overlaps the device's kernels queued above
            y_ND[starts[e]:ends[e]] = to_device_async(self.cpu.run(self.layer, e, host_rows[e]),
                                                 y_ND.device)
        if split:
            for e, y_RD in zip(split, pending.result()):
                y_ND[starts[e]:ends[e]] += to_device_async(y_RD, y_ND.device)
        return y_ND

    def _compute(self, x_ND: torch.Tensor, y_ND: torch.Tensor, experts: list[int],
                 slots: list[int], starts: list[int], ends: list[int]) -> None:
        """y_ND[rows of `experts`] = their MLPs, run over the pool with rows sorted by slot."""
        cache = self.cache
        by_slot = sorted(zip(slots, experts))
        counts_S = [0] * cache.num_slots
        for s, e in by_slot:
            counts_S[s] = ends[e] - starts[e]
        ends_S = list(itertools.accumulate(counts_S))
        rows = [r for _, e in by_slot for r in range(starts[e], ends[e])]
        identity = rows == list(range(x_ND.shape[0]))
        both = host_to_device(ends_S + ([] if identity else rows), x_ND.device)
        ends_S = both[:cache.num_slots]
        x_RD = x_ND if identity else x_ND[both[cache.num_slots:]]
        # The chooser weighs rows per expert (few rows: the weight-streaming kernel): judge by
        # the slots in use, not the whole pool, whose empty slots cost those kernels nothing.
        used = len(experts)
        fn = resolve_expert_backend(self.backends.experts, x_RD, cache.w_in_SDI[:used],
                                    cache.w_out_SFD[:used])
        y_RD = fn(x_RD, ends_S, cache.w_in_SDI, cache.b_in_SI, cache.w_out_SFD, cache.b_out_SD,
                  self.activation, False)
        if identity:
            y_ND.copy_(y_RD)
        else:
            y_ND[both[cache.num_slots:]] = y_RD

