"""Pre-gate heads (Pre-gated MoE, ISCA 2024): predict MoE layer l+1's experts from layer l's input.

An offloading engine must know a layer's experts before the layer runs to hide their copy behind
compute. Zero-shot pre-gating applies layer l+1's own router to layer l's FFN input, which is a
different vector (layer l's FFN, layer l+1's attention and a different norm lie between them).
A pre-gate head is a linear map trained for exactly that input: head l gives logits over layer
l+1's experts from layer l's normalised FFN input x_TD, and its top-k (k = layer l+1's top_k) is
the prediction. It is part of the network (`ModelConfig.pregate`), so it is stored with the
weights in moeflow's one checkpoint format, but the model's forward never runs it: outputs do
not depend on it. The engine's `--prefetch pregate` does (moeflow.infer.offload.prefetch).

Training (`moeflow train --pregate --init CKPT`, moeflow.train.pregate): the backbone frozen,
each head starts as a copy of the next layer's router gate (so it starts exactly at zero-shot's
predictions) and learns the routing the backbone actually produces, as served (dropless, no
noise), by cross-entropy against the uniform distribution over the true top-k.

Legend: T tokens, D model dim, E experts of the next MoE layer, K its top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PregateHeads(nn.Module):
    """heads[i]: MoE layer i's input -> logits over MoE layer i+1's experts."""

    def __init__(self, d_model: int, num_experts: tuple[int, ...], top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.heads = nn.ModuleList(nn.Linear(d_model, e, bias=False) for e in num_experts[1:])

    def __len__(self) -> int:
        return len(self.heads)

    @torch.no_grad()
    def init_from_routers(self, routers: list[nn.Module]) -> None:
        """Head i := router i+1's gate: predictions equal zero-shot pre-gating's."""
        for head, router in zip(self.heads, routers[1:], strict=True):
            head.weight.copy_(router.gate.weight)

    def logits(self, i: int, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 logits_TE of head i (the router's precision)."""
        return F.linear(x_TD.float(), self.heads[i].weight.float())

    def predict(self, i: int, x_TD: torch.Tensor) -> torch.Tensor:
        """ids_TK: the k experts of MoE layer i+1 with the largest logits."""
        return self.logits(i, x_TD).topk(self.top_k, dim=-1).indices


def pregate_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each token's true top-k experts."""
    target_TE = torch.zeros_like(logits_TE).scatter_(1, ids_TK, 1.0 / ids_TK.shape[1])
    return -(target_TE * logits_TE.log_softmax(dim=-1)).sum(-1).mean()


def topk_recall(pred_TK: torch.Tensor, true_TK: torch.Tensor) -> tuple[int, int]:
    """(true assignments that were predicted, true assignments), per token."""
    hit = (pred_TK[:, :, None] == true_TK[:, None, :]).any(dim=1)
    return int(hit.sum()), true_TK.numel()
