"""Giving a trained MoE model a lookahead router (`moeflow train --init RUN --lookahead`).

Two phases in one run (moeflow.model.lookahead says what the router is and why):
  1. distillation, steps 1..`lookahead_distill_steps`: the backbone frozen (its forward runs
     without gradients and routes by the layers' own routers, as served: dropless, no noise),
     the lookahead router learns every MoE layer's served top-k from the token ids alone, by
     cross-entropy against the uniform distribution over the true top-k (the objective the
     pre-gate heads measured best, moeflow.model.pregate.pregate_loss);
  2. fine-tuning, the remaining steps: the model routes by the lookahead router and the whole
     network (backbone, lookahead router) trains on the LM loss plus the usual router losses,
     which now balance the lookahead router's choices; the layers' own routers no longer
     route and get no gradient.
The trainer's loop is unchanged: it asks this module for phase 1's objective and for the
validation figures. Validation logs, besides the LM loss as the model now routes (lookahead),
the LM loss the same weights give when routed by their own routers (`val_loss_own_routers`) and
the lookahead router's agreement with those routers (`val_lookahead_agreement`: the share of
the own routers' (token, expert) choices that the lookahead router also makes). At step 0 the
own-router loss is the --init model's loss; at the end, the lookahead loss is what the model
serves with: the quality cost is their difference.

Legend: B sequences, T tokens, D model dim, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.model.pregate import pregate_loss, topk_recall


def distill_objective(model: nn.Module, input_BT: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean over MoE layers of the lookahead router's loss, statistics) for one micro-batch,
    the backbone frozen."""
    B, T = input_BT.shape
    first_B1 = torch.zeros(B, 1, dtype=torch.int64, device=input_BT.device)
    with torch.no_grad():
        served = model(input_BT, inference=True, logits_at=first_B1, own_routers=True).routing
        emb_BTD = model.tok_emb(input_BT)
    hist_BHD = emb_BTD.new_zeros(B, model.lookahead.history, emb_BTD.shape[-1])
    logits = model.lookahead(emb_BTD, hist_BHD)
    losses, hits, total = [], 0, 0
    for logits_TE, r in zip(logits, served, strict=True):
        losses.append(pregate_loss(logits_TE, r.ids_TK))
        h, n = topk_recall(logits_TE.detach().topk(r.ids_TK.shape[1], dim=-1).indices, r.ids_TK)
        hits, total = hits + h, total + n
    loss = torch.stack(losses).mean()
    agreement = torch.tensor(hits / total, dtype=torch.float64, device=loss.device)
    return loss, {"loss": loss.detach(), "lookahead_agreement": agreement}


@torch.no_grad()
def validation_counts(model: nn.Module, input_BT: torch.Tensor, target_BT: torch.Tensor,
                      lookahead_ids: list[torch.Tensor]) -> torch.Tensor:
    """[LM loss summed over tokens with the own routers, own routers' choices the lookahead
    router also made, own routers' choices] for one batch; `lookahead_ids`: each MoE layer's
    ids_TK from the model's (lookahead-routed) forward of the same batch."""
    out = model(input_BT, own_routers=True)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), target_BT.flatten(), reduction="sum")
    hits = total = 0
    for pred_TK, r in zip(lookahead_ids, out.routing, strict=True):
        h, n = topk_recall(pred_TK, r.ids_TK)
        hits, total = hits + h, total + n
    return torch.stack([ce.double(), torch.tensor(float(hits), dtype=torch.float64,
                                                   device=ce.device),
                        torch.tensor(float(total), dtype=torch.float64, device=ce.device)])
