"""Pre-gating: predicting the next MoE layer's experts from this layer's input, and its score.

Why it pays: an expert copy over PCIe takes milliseconds, a layer's compute at decode far less,
so an offloaded layer that learns its experts only from its own router waits for every miss.
Predicting layer l+1's experts while layer l runs lets their copies overlap layer l's experts
and layer l+1's attention (Pre-gated MoE, ISCA 2024).

"router" (zero-shot): layer l+1's own router applied to layer l's normalised FFN input. The
residual stream changes little from one layer to the next, so the next router's choice on it is
a good guess without any training; how good is measured, not assumed (`PrefetchStats`).

The predictor sees the dispatched rows x_ND (each token repeated once per chosen expert), which
gives the same set of predicted experts as the tokens themselves (duplicates predict the same),
so the offloaded experts module needs nothing beyond what MoELayer already passes it.

"pregate" (Pre-gated MoE): the model's fine-tuned pre-gate head for layer l+1, trained for
exactly this input (`moeflow train --pregate`, moeflow.model.pregate); same top-k, higher recall.

"lookahead" (Read-ME): a model with a lookahead router (moeflow.model.lookahead) routes every
layer from token ids alone, so at the start of a decode step the engine knows every layer's
experts for the step before any layer runs (`LookaheadPrefetch`). They are the experts the step
will compute with, not a guess: recall is 1 by construction. Copies are issued in layer order
as far as the cache has spare slots (empty, or holding an expert the rest of the step does not
need, `ExpertCache.spare_slots`); what does not fit is issued as the layers ahead release theirs
(`refill`, called by each layer after its compute is queued), so copies for layer l+2.. run
under layer l's compute. A prefetch never evicts an expert a later layer of the step needs: when
a step needs more experts than there are slots, one of them has to go, and evicting it early
(even the one needed last, Belady's choice) measured worse than leaving that eviction to the
layer's demand access, which by then also has the just-computed layers' experts to choose from
(at batch 8 with 40 of 96 slots: 839 KiB copied per token stopping at the spare slots, 876 with
no prefetch, 1134-1171 issuing further; benchmarks/results/offload/README.md, "Lookahead
routing"). Victims are the ones demand would pick for the same layer (the cyclic walk from it),
so at batch 1, where a step's experts fit, the bytes match no prefetch's.

Legend: N dispatched rows, D model dim, K top-k, B batch rows, H history tokens, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeflow.infer.offload.expert_cache import ExpertCache
from moeflow.model.pregate import PregateHeads
from moeflow.model.router import Router


class Predictor(Protocol):
    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        """ids_NK: predicted experts of the next MoE layer, per row (device tensor)."""


class RouterPredictor:
    """Zero-shot pre-gate: the next MoE layer's router, routing as served (dropless, no noise)."""

    def __init__(self, next_router: Router) -> None:
        self.router = next_router

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.router(x_ND, inference=True).ids_TK


class PregatePredictor:
    """Fine-tuned pre-gate: head `index` of the model's PregateHeads (MoE layer index+1)."""

    def __init__(self, heads: PregateHeads, index: int) -> None:
        self.heads, self.index = heads, index

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.heads.predict(self.index, x_ND)


@dataclass(frozen=True)
class PrefetchStats:
    predicted: int  # experts predicted (distinct per layer forward)
    needed: int  # experts the predicted layers then computed with (distinct per forward)
    correct: int  # needed experts that had been predicted

    @property
    def recall(self) -> float:
        """The hit rate of the prediction: share of needed experts that were predicted."""
        return self.correct / self.needed if self.needed else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0


class PrefetchLedger:
    """Remembers each layer's latest prediction and scores it when that layer runs."""

    def __init__(self) -> None:
        self._pending: dict[int, set[int]] = {}
        self.predicted = self.needed = self.correct = 0

    def predict(self, layer: int, experts: set[int]) -> None:
        self._pending[layer] = experts
        self.predicted += len(experts)

    def score(self, layer: int, needed: set[int]) -> None:
        guess = self._pending.pop(layer, None)
        if guess is None:
            return
        self.needed += len(needed)
        self.correct += len(needed & guess)

    def stats(self) -> PrefetchStats:
        return PrefetchStats(self.predicted, self.needed, self.correct)


class LookaheadPrefetch:
    """prefetch="lookahead": a decode step's experts of every MoE layer, issued before it runs."""

    def __init__(self, cache: ExpertCache, ledger: PrefetchLedger) -> None:
        self.cache, self.ledger = cache, ledger
        self._pending: dict[int, list[int]] = {}  # layer -> predicted experts not yet issued
        self._needed: dict[int, list[int]] = {}  # layer -> all its predicted experts

    def plan(self, ids_per_layer: list[torch.Tensor]) -> None:
        """Record each MoE layer's experts for the step (ids_TK from the model's
        `lookahead_routing`; one host sync for all layers) and issue what fits."""
        flat = torch.cat([ids.reshape(-1) for ids in ids_per_layer]).tolist()
        per_layer = len(flat) // max(len(ids_per_layer), 1)
        self._pending, self._needed = {}, {}
        for layer in range(len(ids_per_layer)):
            experts = sorted(set(flat[layer * per_layer:(layer + 1) * per_layer]))
            self.ledger.predict(layer, set(experts))
            self._pending[layer] = experts
            self._needed[layer] = experts
        self.refill(-1)

    def refill(self, after: int) -> None:
        """Forget layers up to `after` (they have run) and issue the later layers' experts, in
        layer order, while the cache has a spare slot (the module docstring says why no further).
        The later layers' experts are reserved, so demand evicts them last."""
        for layer in [k for k in self._pending if k <= after]:
            left = self._pending.pop(layer)
            del self._needed[layer]
            if left:
                self.cache.count_skipped(len(left))
        self.cache.reserve(frozenset((layer, e) for layer, experts in self._needed.items()
                                     for e in experts))
        spare = self.cache.spare_slots()  # a resident expert pinned here was reserved: no change
        for layer in sorted(self._pending):
            experts = self._pending[layer]
            issued = 0
            for e in experts:
                if (layer, e) not in self.cache.slot_of:
                    if spare <= 0:
                        break
                    spare -= 1
                self.cache.prefetch(layer, [e])
                issued += 1
            self._pending[layer] = experts[issued:]
            if experts[issued:]:
                return
