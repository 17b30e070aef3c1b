"""The decoupled lookahead router (Read-ME, NeurIPS 2024): every MoE layer's routing from token ids.

Why: an offloading engine must know a layer's experts before the layer runs to hide their
copies. A layer's own router reads the hidden state, which exists only once the layers below
have run; predicting it from an earlier layer (pre-gating, moeflow.model.pregate) misses part of
the time and sees only one layer ahead. Read-ME decouples routing from the backbone: the router
depends only on the token sequence, so the routing of *every* layer for the next tokens is known
as soon as those tokens are, before the step's forward starts. The backbone is then fine-tuned
to work with that routing, so the router's choice *is* the routing: a prefetch of its experts
misses nothing by construction. The price is model quality, measured, not assumed
(benchmarks/results/offload/README.md, "Lookahead routing").

What it computes (`ModelConfig.lookahead` = C, `lookahead_rank` = R): for each token, a window of
the token's embedding and the C-1 embeddings before it in its sequence (the backbone's own token
embeddings, each RMS-normalised without weights; zero where the sequence has no such token), and
from its concatenation u (C·D wide) the logits of all MoE layers at once:
    logits = W·u (+ U·gelu(V·u + b) + c when R > 0), split into one [T, E_l] block per layer.
A causal window rather than the token alone: Read-ME's router sees the sequence (a small causal
transformer); a short window keeps that context where most of it is (the previous token) at the
cost of one small matmul, and it keeps the engine's prediction a function of tokens it already
has: the running request's last C tokens (no state of its own to cache per sequence). The
measured ceiling of the token alone, with a frozen backbone, was 0.70 recall (README above).

Initialisation for distillation (`moeflow train --lookahead`, moeflow.train.lookahead): W's
current-token block starts as each layer's router gate (zero-shot: the gate applied to the
embedding, since the residual stream starts from it), the rest of W and the MLP's output at
zero; it then learns the original routers' served choices with the backbone frozen.

Every MoE layer routes by its block of logits through its own Router (moeflow.model.router:
same selection, weights, renormalisation, capacity, losses), so there is one routing code path;
the model computes the logits once per forward (moeflow.model.transformer).

Legend: B sequences, T tokens, H = C-1 tokens of history, D model dim, E experts of a layer,
R MLP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import ModelConfig


class LookaheadRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: tuple[int, ...], context: int, rank: int
                 ) -> None:
        super().__init__()
        self.d_model, self.context = d_model, context
        self.num_experts = tuple(num_experts)
        width, total = context * d_model, sum(num_experts)
        self.weight = nn.Parameter(torch.empty(total, width))
        self.down = nn.Linear(width, rank) if rank else None
        self.up = nn.Linear(rank, total) if rank else None

    @classmethod
    def of(cls, config: ModelConfig) -> "LookaheadRouter":
        return cls(config.d_model, config.num_experts, config.lookahead, config.lookahead_rank)

    @property
    def history(self) -> int:
        """Tokens before a sequence's first input that the window needs (C-1)."""
        return self.context - 1

    def forward(self, emb_BTD: torch.Tensor, hist_BHD: torch.Tensor) -> list[torch.Tensor]:
        """fp32 logits_TE of every MoE layer (tokens flattened B-major), from the inputs'
        embeddings and the embeddings of the H tokens before each sequence's first input
        (zeros where there are none)."""
        B, T, D = emb_BTD.shape
        H = self.history
        if hist_BHD.shape != (B, H, D):
            raise ValueError(f"lookahead history has shape {tuple(hist_BHD.shape)}; expected "
                             f"{(B, H, D)} (the {H} tokens before each sequence's inputs)")
        full = F.rms_norm(torch.cat([hist_BHD, emb_BTD], dim=1).float(), (D,), eps=1e-6)
        # window c: the token c positions back, current token first (W's init relies on it)
        u_BTW = torch.cat([full[:, H - c:H - c + T] for c in range(self.context)], dim=-1)
        u_TW = u_BTW.reshape(B * T, -1)
        logits = F.linear(u_TW, self.weight.float())
        if self.down is not None:
            h = F.gelu(F.linear(u_TW, self.down.weight.float(), self.down.bias.float()))
            logits = logits + F.linear(h, self.up.weight.float(), self.up.bias.float())
        return list(logits.split(self.num_experts, dim=-1))

    @torch.no_grad()
    def init_from_routers(self, routers: list[nn.Module]) -> None:
        """Current-token block := the layers' router gates, everything else that feeds the
        output zero: the logits start as the routers' on the (normalised) token embedding."""
        self.weight.zero_()
        self.weight[:, :self.d_model] = torch.cat([r.gate.weight.float() for r in routers])
        if self.up is not None:
            self.down.reset_parameters()
            self.up.weight.zero_()
            self.up.bias.zero_()
