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

Not done here: Read-ME's decoupled lookahead router, which would be a further `Predictor`.

Legend: N dispatched rows, D model dim, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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
