"""The forecaster: point-wise value embedding → moeflow decoder blocks → one head per horizon.

Time-MoE's architecture at small scale. Each time step is one token, embedded from its single
(standardised) value by a SwiGLU, silu(x·w_g + b_g) ⊙ (x·w_u + b_u), as Time-MoE does: no
tokenizer, no patching, so a forecast can start after any point. The blocks are moeflow's own
(`moeflow.model.transformer.Block`: RMSNorm, RoPE, causal attention, an MoE FFN with a
sigmoid-gated shared expert), built from `ForecastModelConfig.decoder_config()`, so routing,
dispatch, the experts and the router's balance loss are the LM's. Causal attention makes the
output at position t a function of inputs 0..t only.

Multi-resolution heads: head h maps each position's final state to h future steps × channels
(channel 0 the point forecast, then one per quantile level). All heads are trained together
from every position; forecasting picks among them (moeflow.forecast.predict).

Legend: B series windows, T positions, D model dim, H a head's horizon, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.forecast.config import ForecastModelConfig
from moeflow.model.norms import make_norm
from moeflow.model.rope import rope_cos_sin
from moeflow.model.transformer import Block, LayerRouting, init_parameters
from moeflow.ops.backend import Backends, ChoosesBackends, set_backends


@dataclass(frozen=True)
class ForecastOutput:
    heads: tuple[torch.Tensor, ...]  # per horizon h: [B, T, h, C], standardised values
    router_loss: torch.Tensor  # Σ over MoE layers of aux_coef·aux (ready to add to the loss)
    aux_loss: torch.Tensor  # Σ of unweighted balance losses
    routing: tuple[LayerRouting, ...]


class ValueEmbedding(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(1, d_model)
        self.up = nn.Linear(1, d_model)

    def forward(self, x_BT: torch.Tensor) -> torch.Tensor:
        x_BT1 = x_BT[..., None]
        return F.silu(self.gate(x_BT1)) * self.up(x_BT1)


class TimeMoE(nn.Module, ChoosesBackends):
    def __init__(self, config: ForecastModelConfig, backends: Backends = Backends()) -> None:
        super().__init__()
        self.config = config
        self.decoder = config.decoder_config()
        self.backends = backends
        self.embed = ValueEmbedding(config.d_model)
        self.blocks = nn.ModuleList(Block(self.decoder, i, spec, backends)
                                    for i, spec in enumerate(self.decoder.ffn_specs()))
        self.final_norm = make_norm("llama", config.d_model, self.decoder.norm_eps, backends)
        self.heads = nn.ModuleList(nn.Linear(config.d_model, h * config.channels)
                                   for h in config.horizons)
        init_parameters(self, config.init_std, config.n_layers)

    def set_backends(self, backends: Backends) -> None:
        set_backends(self, backends)

    def forward(self, x_BT: torch.Tensor, inference: bool = False) -> ForecastOutput:
        """x_BT: standardised values (right padding is harmless: attention is causal).
        `inference=True` routes without noise (see moeflow.model.router)."""
        B, T = x_BT.shape
        if T > self.config.context_len:
            raise ValueError(f"{T} points exceed context_len {self.config.context_len}")
        x_BTD = self.embed(x_BT)
        positions = torch.arange(T, device=x_BT.device)[None]
        rope = rope_cos_sin(positions, self.decoder.head_dim, self.decoder.rope_theta,
                            x_BTD.dtype)
        stats, losses = [], []
        for i, block in enumerate(self.blocks):
            x_BTD, routing = block(x_BTD, rope, None, inference)
            losses.append(torch.stack([routing.loss, routing.aux_loss]))
            stats.append(LayerRouting(i, routing.counts_E, routing.num_dropped,
                                      routing.ids_TK.numel(), routing.aux_loss,
                                      routing.z_loss, routing.ids_TK))
        router_loss, aux = torch.stack(losses).sum(0).unbind()
        h_BTD = self.final_norm(x_BTD)
        C = self.config.channels
        heads = tuple(head(h_BTD).view(B, T, H, C)
                      for head, H in zip(self.heads, self.config.horizons))
        return ForecastOutput(heads, router_loss, aux, tuple(stats))
