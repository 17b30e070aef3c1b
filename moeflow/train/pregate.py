"""Fine-tuning pre-gate heads with the backbone frozen (`moeflow train --pregate --init CKPT`).

The trainer's loop is unchanged; with `TrainConfig.pregate` it asks this module for the
objective and for the validation figures. Per micro-batch: one no-grad forward of the frozen
backbone, routed as served (dropless, no noise, `inference=True`), records each MoE layer's
normalised input and chosen experts (forward hooks observe them, removed on exit); head i then
learns MoE layer i+1's choices from MoE layer i's input (moeflow.model.pregate.pregate_loss, or
with `--pregate-loss kl` layer i+1's router distribution, pregate_kl_loss).

Recall is the hit rate the offloading engine's prefetch sees at batch 1: the share of layer
i+1's true (token, expert) assignments that the prediction from layer i's input contains. It is
reported for the heads and for zero-shot pre-gating (layer i+1's router on layer i's input) on
the same validation windows, so the metrics show what training bought.

Legend: B sequences, T tokens, D model dim, K top-k.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from moeflow.model.pregate import pregate_kl_loss, pregate_loss, topk_recall
from moeflow.model.router import router_logits


@contextmanager
def recording_moe(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[(x_TD, ids_TK)] of every MoE layer, in layer order, for the forwards run inside."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, out):
        x = args[0]
        seen.append((x.reshape(-1, x.shape[-1]).detach(), out[1].ids_TK.detach()))

    handles = [m.register_forward_hook(hook) for m in model.moe_layers()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def backbone_routing(model: nn.Module, input_BT: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE layer's (input x_TD, served choice ids_TK) for one batch, without gradients."""
    first_B1 = torch.zeros(input_BT.shape[0], 1, dtype=torch.int64, device=input_BT.device)
    with torch.no_grad(), recording_moe(model) as seen:
        model(input_BT, inference=True, logits_at=first_B1)  # the LM head's output is unused
    return list(seen)


def pregate_objective(model: nn.Module, input_BT: torch.Tensor, loss: str = "topk-ce"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean of the heads' losses, statistics) for one micro-batch. `loss`: "topk-ce" (the
    served top-k as a uniform target) or "kl" (the next router's distribution on its own
    input, moeflow.model.pregate.pregate_kl_loss)."""
    seen = backbone_routing(model, input_BT)
    heads, moe = model.pregate, model.moe_layers()
    losses, hits, total = [], 0, 0
    for i in range(len(heads)):
        x_TD, (next_TD, true_TK) = seen[i][0], seen[i + 1]
        logits_TE = heads.logits(i, x_TD)
        if loss == "kl":
            teacher_TE = router_logits(next_TD, moe[i + 1].router.gate.weight)
            losses.append(pregate_kl_loss(logits_TE, teacher_TE))
        else:
            losses.append(pregate_loss(logits_TE, true_TK))
        h, n = topk_recall(logits_TE.detach().topk(heads.top_k, dim=-1).indices, true_TK)
        hits, total = hits + h, total + n
    mean = torch.stack(losses).mean()
    recall = torch.tensor(hits / total, dtype=torch.float64, device=mean.device)
    return mean, {"loss": mean.detach(), "pregate_recall": recall}


@torch.no_grad()
def recall_counts(model: nn.Module, input_BT: torch.Tensor) -> torch.Tensor:
    """[head hits, zero-shot hits, true assignments] over every head, for one batch."""
    seen = backbone_routing(model, input_BT)
    moe = model.moe_layers()
    counts = [0, 0, 0]
    for i in range(len(model.pregate)):
        x_TD, (_, true_TK) = seen[i][0], seen[i + 1]
        head, n = topk_recall(model.pregate.predict(i, x_TD), true_TK)
        zero, _ = topk_recall(moe[i + 1].router(x_TD, inference=True).ids_TK, true_TK)
        counts = [counts[0] + head, counts[1] + zero, counts[2] + n]
    return torch.tensor(counts, dtype=torch.float64, device=input_BT.device)


def freeze_backbone(model: nn.Module) -> None:
    """Only the pre-gate heads train."""
    model.requires_grad_(False)
    model.pregate.requires_grad_(True)
