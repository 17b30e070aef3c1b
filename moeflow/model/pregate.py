"""Pre-gate heads (Pre-gated MoE, ISCA 2024): predict MoE layer l+1's experts from layer l's input.

An offloading engine must know a layer's experts before the layer runs to hide their copy behind
compute. Zero-shot pre-gating applies layer l+1's own router to layer l's FFN input, which is a
different vector (layer l's FFN, layer l+1's attention and a different norm lie between them).
A pre-gate head is trained for exactly that input: head l gives logits over layer l+1's experts
from layer l's normalised FFN input x_TD, and its top-k (k = layer l+1's top_k) is the
prediction. It is part of the network (`ModelConfig.pregate`), so it is stored with the weights
in moeflow's one checkpoint format, but the model's forward never runs it: outputs do not depend
on it. The engine's `--prefetch pregate` does (moeflow.infer.offload.prefetch).

A head is a linear map W (E x D) plus, with `ModelConfig.pregate_rank` R > 0, an MLP of width R
U·gelu(V·x + b) + c, with `ModelConfig.pregate_depth` hidden layers (2: U·gelu(M·gelu(V·x + b)
+ m) + c). The MLP is there because part of what separates layer l's input from layer l+1's is
layer l's FFN output, a nonlinear function of x_TD that a linear map cannot follow; measured on
a trained 6-MoE-layer model (benchmarks/results/offload/README.md, "Which pre-gate head" and
"Pre-gate heads past 90 %") it buys several points of recall over the linear head at the same
objective, and a second hidden layer about one point more than the first alone.

Training (`moeflow train --pregate --init CKPT`, moeflow.train.pregate): the backbone frozen,
W starts as a copy of the next layer's router gate and U at zero (so a head starts exactly at
zero-shot's predictions) and learns the routing the backbone actually produces, as served
(dropless, no noise), by cross-entropy against the uniform distribution over the true top-k
(`pregate_loss`), or by KL to the next router's full distribution on its own input
(`pregate_kl_loss`, `--pregate-loss kl`): on little data KL predicted worse (it spends the
head's capacity on the order of experts that are not chosen), on 4x more it predicted better on
every layer pair but the first; the README section "Pre-gate heads past 90 %" has both.

Legend: T tokens, D model dim, E experts of the next MoE layer, K its top-k, R MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import ModelConfig


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), layer.bias.float())


class PregateHead(nn.Module):
    """logits_TE = x·Wᵀ (+ the MLP's output when rank > 0), in fp32 (the router's precision).
    The MLP: down (D -> R), depth-1 `mid` layers (R -> R), up (R -> E), gelu between; a depth-1
    head has the parameter names heads saved before depth existed had."""

    def __init__(self, d_model: int, num_experts: int, rank: int, depth: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.down = nn.Linear(d_model, rank) if rank else None
        self.mid = nn.ModuleList(nn.Linear(rank, rank) for _ in range(depth - 1)) if rank else None
        self.up = nn.Linear(rank, num_experts) if rank else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        logits_TE = F.linear(x_TD, self.weight.float())
        if self.down is not None:
            h_TR = F.gelu(_linear(self.down, x_TD))
            for layer in self.mid:
                h_TR = F.gelu(_linear(layer, h_TR))
            logits_TE = logits_TE + _linear(self.up, h_TR)
        return logits_TE


class PregateHeads(nn.Module):
    """heads[i]: MoE layer i's input -> logits over MoE layer i+1's experts."""

    def __init__(self, d_model: int, num_experts: tuple[int, ...], top_k: int, rank: int = 0,
                 depth: int = 1) -> None:
        super().__init__()
        self.top_k = top_k
        self.heads = nn.ModuleList(PregateHead(d_model, e, rank, depth) for e in num_experts[1:])

    @classmethod
    def of(cls, config: ModelConfig) -> "PregateHeads":
        return cls(config.d_model, config.num_experts, config.router.top_k, config.pregate_rank,
                   config.pregate_depth)

    def __len__(self) -> int:
        return len(self.heads)

    @torch.no_grad()
    def init_from_routers(self, routers: list[nn.Module]) -> None:
        """Head i := router i+1's gate (MLP output zero): predictions equal zero-shot's. The
        MLP's hidden layers start random (torch's Linear init), so its gradient is not zero."""
        for head, router in zip(self.heads, routers[1:], strict=True):
            head.weight.copy_(router.gate.weight)
            if head.up is not None:
                head.down.reset_parameters()
                for layer in head.mid:
                    layer.reset_parameters()
                head.up.weight.zero_()
                head.up.bias.zero_()

    def logits(self, i: int, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 logits_TE of head i."""
        return self.heads[i](x_TD)

    def predict(self, i: int, x_TD: torch.Tensor) -> torch.Tensor:
        """ids_TK: the k experts of MoE layer i+1 with the largest logits."""
        return self.logits(i, x_TD).topk(self.top_k, dim=-1).indices


def pregate_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each token's true top-k experts."""
    target_TE = torch.zeros_like(logits_TE).scatter_(1, ids_TK, 1.0 / ids_TK.shape[1])
    return -(target_TE * logits_TE.log_softmax(dim=-1)).sum(-1).mean()


def pregate_kl_loss(logits_TE: torch.Tensor, teacher_TE: torch.Tensor) -> torch.Tensor:
    """KL(next router's softmax on its own input || the head's softmax), mean over tokens."""
    return F.kl_div(logits_TE.log_softmax(-1), teacher_TE.float().log_softmax(-1),
                    log_target=True, reduction="batchmean")


def topk_recall(pred_TK: torch.Tensor, true_TK: torch.Tensor) -> tuple[int, int]:
    """(true assignments that were predicted, true assignments), per token."""
    hit = (pred_TK[:, :, None] == true_TK[:, None, :]).any(dim=1)
    return int(hit.sum()), true_TK.numel()
