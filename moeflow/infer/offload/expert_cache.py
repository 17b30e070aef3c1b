"""The GPU expert cache: a fixed pool of whole-expert slots shared by every MoE layer.

One pool tensor per projection (`w_in_SDI`, `w_out_SFD`, optional biases), allocated once, so
the memory is fixed by the budget and the caching allocator never sees expert traffic. A slot
holds one (MoE layer, expert); the layer computes directly on the pool (moeflow.infer.offload.
offloaded_experts sorts its rows by slot), so a hit costs nothing but the lookup.

Eviction policy (lower priority is evicted first; empty slots are used before any eviction):
  * "lru": the slot used longest ago;
  * "lfu": the expert used least often, counted over the engine's whole history (not reset on
    eviction: an expert's popularity is a property of the expert, MoE-Infinity's observation),
    ties broken by least recent use;
  * "cyclic": decode visits the MoE layers in a fixed cycle, so an expert of the layer whose turn
    comes last is the one needed furthest in the future (Belady's choice, knowing the order but
    not the routing): evict from the loading layer itself (its other experts return next token),
    then from the layer before it, and so on backwards round the cycle; within a layer, LFU.
    LRU and LFU thrash here: with fewer slots than one cycle's experts, LRU has always evicted
    a layer's experts by the time its turn comes (hit rate 0 whatever the routing), and LFU
    degenerates to LRU when counts tie, as they do when routing is even
    (benchmarks/offload_policy_replay.py measures all three on trained and random routing).
"Use" is a demand access by a layer's forward; a prefetch stamps recency but not frequency.

Pins: slots that must not be evicted now: the experts a layer is computing with (`acquire` ..
`release`), and prefetched experts until their layer runs (released by that layer's
`acquire`). A prefetch that finds every slot pinned is skipped and counted, never blocking.
Reserved experts (`reserve`): ones a later layer of the current step is known to need (lookahead
prefetch): evicted only when every other unpinned slot is gone, so a copy does not throw out an
expert that would have to be copied back in the same step. `spare_slots` counts the slots a copy
can take without evicting a pinned or a reserved expert; lookahead prefetch issues only that
many, leaving any eviction of a reserved expert to demand (see moeflow.infer.offload.prefetch).

Victims come from a heap of (priority, slot) entries with lazy invalidation (one heap per layer
for "cyclic"): O(log S) per miss (plus O(layers) for "cyclic"), so a pool of thousands of small
experts (Qwen3-30B-A3B's) costs no scan per miss.

Legend: S slots, D model dim, F expert ffn dim, I = F or 2F.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from moeflow.infer.offload.expert_store import ExpertStore, LayerExperts
from moeflow.infer.offload.mapped_store import MappedExpertStore
from moeflow.infer.offload.streams import SlotStreams

POLICIES = ("lru", "lfu", "cyclic")


@dataclass(frozen=True)
class CacheStats:
    lookups: int  # demand accesses (one per distinct expert a layer forward computes with)
    hits: int  # of those, already resident (or prefetched) when asked for
    prefetches: int  # copies issued ahead of demand
    prefetch_used: int  # prefetched experts that a demand access found
    prefetch_skipped: int  # predictions not prefetched: every slot was pinned
    copies: int  # all copies (demand misses + prefetches)
    bytes_copied: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class ExpertCache:
    def __init__(self, store: ExpertStore | MappedExpertStore, template: LayerExperts,
                 num_slots: int,
                 device: torch.device, policy: str = "cyclic") -> None:
        """`template`: any layer's experts (shapes and dtype of the pool; every layer the
        store holds must match them, see moeflow.infer.offload.placement)."""
        if policy not in POLICIES:
            raise ValueError(f"expert_cache_policy={policy!r}: must be one of "
                             f"{', '.join(POLICIES)}")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots}: the expert cache needs at least one slot")
        self.store, self.num_slots, self.policy = store, num_slots, policy

        def pool(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty(num_slots, *t.shape[1:], dtype=t.dtype,
                                                      device=device)

        first = template
        self.w_in_SDI, self.w_out_SFD = pool(first.w_in_EDI), pool(first.w_out_EFD)
        self.b_in_SI, self.b_out_SD = pool(first.b_in_EI), pool(first.b_out_ED)
        self.streams = SlotStreams(device, num_slots)
        self.key_S: list[tuple[int, int] | None] = [None] * num_slots
        self.slot_of: dict[tuple[int, int], int] = {}
        self._uses: dict[tuple[int, int], int] = {}  # LFU frequency, kept across evictions
        self._stamp: list[int] = [0] * num_slots  # last use (tick), per slot
        self._tick = 0
        # One heap for lru/lfu (key 0); one per MoE layer for cyclic (victims go layer by
        # layer). The store may still be filling (placement builds the cache first).
        self._heaps: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        self._empty = list(range(num_slots - 1, -1, -1))
        self._pinned: dict[int, int] = {}  # slot -> pin count
        self._prefetched: dict[int, set[int]] = {}  # layer -> slots prefetched for it, pinned
        self._counts = dict(lookups=0, hits=0, prefetches=0, prefetch_used=0,
                            prefetch_skipped=0, copies=0, bytes_copied=0)
        self._unused_prefetch: set[int] = set()
        self._reserved: frozenset[tuple[int, int]] = frozenset()

    # -- queries ----------------------------------------------------------------------------

    def resident(self, layer: int) -> set[int]:
        return {k[1] for k in self.slot_of if k[0] == layer}

    @property
    def has_empty_slot(self) -> bool:
        return bool(self._empty)

    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    # -- demand -----------------------------------------------------------------------------

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Slots holding `experts` of `layer`, pinned, copies issued for misses. The caller
        waits (`streams.wait_ready`), computes, then calls `release`. Releases the layer's
        prefetch pins first: from here on demand decides what stays."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts requested at once; the cache has "
                             f"{self.num_slots} slots")
        slots: list[int | None] = [self.slot_of.get((layer, e)) for e in experts]
        for slot in slots:  # pin the hits first: no miss below may evict one of them
            if slot is not None:
                self._pin(slot)
        self.unpin_prefetched(layer)
        for i, e in enumerate(experts):
            key = (layer, e)
            self._counts["lookups"] += 1
            if slots[i] is not None:
                self._counts["hits"] += 1
                if slots[i] in self._unused_prefetch:
                    self._unused_prefetch.discard(slots[i])
                    self._counts["prefetch_used"] += 1
            else:
                slots[i] = self._load(key)
                self._pin(slots[i])
            self._uses[key] = self._uses.get(key, 0) + 1
            self._touch(slots[i])
        return slots

    def release(self, slots: list[int]) -> None:
        """End of the compute that read `slots` (as issued): they may be evicted again."""
        self.streams.read_done(slots)
        for s in slots:
            self._unpin(s)

    # -- prefetch ---------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start copying `experts` of `layer` if absent, pinned until `layer`'s acquire. A copy
        evicts what a demand access of `layer` would (the cyclic walk starts at `layer`)."""
        held = self._prefetched.setdefault(layer, set())
        for e in experts:
            key = (layer, e)
            slot = self.slot_of.get(key)
            if slot is None:
                if len(self._pinned) >= self.num_slots:
                    self._counts["prefetch_skipped"] += 1
                    continue
                slot = self._load(key)
                self._counts["prefetches"] += 1
                self._unused_prefetch.add(slot)
                self._touch(slot)
            if slot not in held:
                held.add(slot)
                self._pin(slot)

    def spare_slots(self) -> int:
        """Slots a copy could take now without evicting a pinned or a reserved expert: the
        empty ones and the unpinned ones that hold an unreserved expert. O(reserved keys)."""
        kept = sum(1 for k in self._reserved
                   if k in self.slot_of and self.slot_of[k] not in self._pinned)
        return self.num_slots - len(self._pinned) - kept

    def reserve(self, keys: frozenset[tuple[int, int]]) -> None:
        """(layer, expert) keys to evict last (see the module docstring); replaces the last."""
        self._reserved = keys

    def count_skipped(self, n: int) -> None:
        """Predictions a caller held back (no unpinned slot while it could still help) count
        as skipped prefetches."""
        self._counts["prefetch_skipped"] += n

    def unpin_prefetched(self, layer: int) -> None:
        for s in self._prefetched.pop(layer, ()):
            self._unpin(s)

    # -- internals --------------------------------------------------------------------------

    def _priority(self, slot: int) -> tuple[int, ...]:
        if self.policy in ("lfu", "cyclic"):
            return (self._uses.get(self.key_S[slot], 0), self._stamp[slot])
        return (self._stamp[slot],)

    def _touch(self, slot: int) -> None:
        self._tick += 1
        self._stamp[slot] = self._tick
        heap = self._heaps.setdefault(self.key_S[slot][0] if self.policy == "cyclic" else 0, [])
        heapq.heappush(heap, (self._priority(slot), slot))

    def _pin(self, slot: int) -> None:
        self._pinned[slot] = self._pinned.get(slot, 0) + 1

    def _unpin(self, slot: int) -> None:
        n = self._pinned[slot] - 1
        if n:
            self._pinned[slot] = n
        else:
            del self._pinned[slot]

    def _victim(self, layer: int) -> int:
        """A free slot, else the policy's choice among unpinned slots, reserved ones last;
        `layer`: the MoE layer the slot is wanted for (the start of "cyclic"'s backward walk)."""
        if self._empty:
            return self._empty.pop()
        for spare_reserved in (True, False) if self._reserved else (False,):
            if self.policy != "cyclic":
                slot = self._pop_victim(self._heaps.get(0, []), None, spare_reserved)
            else:
                slot, layers = None, self.store.num_layers
                for back in range(layers):
                    j = (layer - back) % layers
                    slot = self._pop_victim(self._heaps.get(j, []), j, spare_reserved)
                    if slot is not None:
                        break
            if slot is not None:
                return slot
        raise RuntimeError("expert cache: every slot is pinned")

    def _pop_victim(self, heap: list, layer: int | None, spare_reserved: bool = False
                    ) -> int | None:
        """The lowest-priority unpinned slot of `heap` (of `layer`'s experts if given; not a
        reserved expert's when `spare_reserved`)."""
        skipped = []
        try:
            while heap:
                prio, slot = heapq.heappop(heap)
                key = self.key_S[slot]
                if key is None or prio != self._priority(slot) or (
                        layer is not None and key[0] != layer):
                    continue  # stale entry: the slot was used again, or refilled, since
                if slot in self._pinned or (spare_reserved and key in self._reserved):
                    skipped.append((prio, slot))
                    continue
                return slot
            return None
        finally:
            for entry in skipped:
                heapq.heappush(heap, entry)

    def _load(self, key: tuple[int, int]) -> int:
        slot = self._victim(key[0])
        old = self.key_S[slot]
        if old is not None:
            del self.slot_of[old]
            self._unused_prefetch.discard(slot)
        self.key_S[slot], self.slot_of[key] = key, slot
        self._counts["copies"] += 1
        self._counts["bytes_copied"] += self.copy_into(slot, key)
        return slot

    def copy_into(self, slot: int, key: tuple[int, int]) -> int:
        """Issue the copy of expert `key` into `slot` on the copy stream; returns its bytes. No
        bookkeeping: `_load` does that; on its own, this times a copy (an empty slot only)."""
        dst = tuple(None if d is None else d[slot]
                    for d in (self.w_in_SDI, self.w_out_SFD, self.b_in_SI, self.b_out_SD))
        with self.streams.copying_into(slot):
            n = self.store.copy_expert(*key, dst)
        self.streams.copied(slot)
        return n
