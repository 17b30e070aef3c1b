"""The decoder: embeddings → blocks (attention + dense/MoE FFN) → final norm → LM head.

GPT family (the DeepSpeed-MoE paper): LayerNorm, GELU MLP, learned positions, tied embeddings.
Llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head.

`model(input_ids)` returns a `ModelOutput`: logits [B, T, V], the summed router losses (weighted
by each layer's coefficients, ready to add to the LM loss) and per-MoE-layer routing statistics.
`model(input_ids, inference=True)` routes as served (dropless, no router noise; the result does
not depend on `model.training`): what the serving engine and a distillation teacher run. The
engine also passes a cache (moeflow.infer.slot_cache describes the protocol) to decode
incrementally, and `logits_at` to compute logits only where they are needed (the last token of
each sequence). Without a cache the forward is plain causal attention over the whole sequence:
the reference the engine is tested against.
`model(input_ids, groups=groups_BT)` gives every token an expert group for a model whose router
names `expert_groups` (moeflow.model.expert_groups: routing stays inside the token's group);
without it every token is in group 0.
With `config.pregate` the model also holds pre-gate heads (`model.pregate`, moeflow.model.pregate)
that predict the next MoE layer's experts for the offloading engine; the forward ignores them.
With `config.lookahead` it holds a decoupled lookahead router (`model.lookahead`, moeflow.model.
lookahead): the forward computes every MoE layer's routing logits from the token ids once, before
the first block, and each MoE layer routes by its share (`own_routers=True` routes by the layers'
own routers instead: what the lookahead router is distilled from). Its window reaches C-1 tokens
before the inputs: `history` [B, C-1] gives them (-1 where the sequence has none); without it the
inputs start their sequences, which a cached forward must say explicitly (`lookahead_routing`
computes the same choices without running the model: the engine's prefetch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from moeflow.config import FFNSpec, ModelConfig
from moeflow.model.attention import Attention
from moeflow.model.expert_groups import TokenGroups, token_groups
from moeflow.model.lookahead import LookaheadRouter
from moeflow.model.mla import MLAttention
from moeflow.model.mlp import MLP
from moeflow.model.moe import MoELayer
from moeflow.model.norms import add_norm, make_norm, pending_add_norm
from moeflow.model.pregate import PregateHeads
from moeflow.model.rope import RopeTables
from moeflow.ops.backend import Backends, ChoosesBackends, compiles_dense, set_backends
from moeflow.ops.linear_cross_entropy import head_logits


@dataclass(frozen=True)
class LayerRouting:
    """Routing statistics of one MoE layer for one forward pass."""

    layer: int
    counts_E: torch.Tensor  # assignments per expert after dropping
    num_dropped: torch.Tensor
    num_assignments: int  # T·K
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    ids_TK: torch.Tensor | None = None  # chosen experts per token (the engine counts real rows)
    kept_TK: torch.Tensor | None = None  # False where capacity dropped the assignment


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when the forward was asked for `hidden`
    # Per MoE layer, in order: its weighted router loss, aux and z (0-dim), summed into
    # router_loss / aux_loss / z_loss when first read (at once when autograd records the forward).
    layer_losses: tuple[torch.Tensor, ...]
    routing: tuple[LayerRouting, ...]
    hidden: torch.Tensor | None = None  # [B, T, D] the LM head's input, with hidden_only=True

    @functools.cached_property
    def _loss_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One stack and sum for all layers (not an add per layer: three kernels per layer at
        # decode), and only when read: a served decode step never reads them, so its CUDA graph
        # holds no copy kernel for them (17 µs of a batch-1 step on the H200, session 14).
        if self.layer_losses:
            return tuple(torch.stack(self.layer_losses).view(-1, 3).sum(0).unbind())
        ref = self.logits if self.logits is not None else self.hidden
        return tuple(ref.new_zeros(3, dtype=torch.float32).unbind())

    @property
    def router_loss(self) -> torch.Tensor:
        """Σ over MoE layers of aux_coef·aux + z_coef·z."""
        return self._loss_sums[0]

    @property
    def aux_loss(self) -> torch.Tensor:
        """Σ of unweighted load-balancing losses."""
        return self._loss_sums[1]

    @property
    def z_loss(self) -> torch.Tensor:
        """Σ of unweighted z-losses."""
        return self._loss_sums[2]

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Share of token→expert assignments dropped by capacity, over every MoE layer (a 0-dim
        tensor on the model's device: reading it is up to the caller, who may batch syncs)."""
        total = sum(r.num_assignments for r in self.routing)
        if total == 0:
            return self.router_loss.new_zeros(())
        return torch.stack([r.num_dropped for r in self.routing]).sum() / total


class Block(nn.Module, ChoosesBackends):
    """Attention sub-layer, then the FFN (dense or MoE), each with its residual.

    With `backends.dense == "compiled"` the dense part runs through torch.compile under
    autograd (regional compilation): `attend` for every block, and the whole block for a dense
    FFN; the MoE FFN stays eager (its routing and expert kernels choose their own paths). The
    compiled functions are compiled once per block structure, not per layer: they take the
    block as an argument, and torch.compile treats a module's parameters as inputs, so the
    layers of one structure share a graph (test_compiled_blocks counts the graphs)."""

    def __init__(self, config: ModelConfig, layer_idx: int, spec: FFNSpec, backends: Backends
                 ) -> None:
        super().__init__()
        self.backends = backends
        activation = "gelu" if config.arch == "gpt" else "swiglu"
        self.attn_norm = make_norm(config.arch, config.d_model, config.norm_eps, backends)
        attention = MLAttention if config.mla else Attention
        self.attn = attention(config, layer_idx, backends)
        self.ffn_norm = make_norm(config.arch, config.d_model, config.norm_eps, backends)
        if spec.is_moe:
            self.ffn = MoELayer(spec, config.d_model, activation, config.mlp_bias, backends)
        else:
            self.ffn = MLP(config.d_model, spec.d_ff, activation, config.mlp_bias, backends)

    def attention(self, x, rope, cache, pending: torch.Tensor | None = None):
        """(x, attention(norm(x))): the residual stream and the attention's output, not yet
        added. `pending`: the previous block's output still to be added to x
        (forward_deferred), added by this block's first norm."""
        if pending is None:
            normed = self.attn_norm(x)
        else:
            x, normed = add_norm(self.attn_norm, x, pending)
        return x, self.attn(normed, rope, cache)

    def attend(self, x, rope, cache, pending: torch.Tensor | None = None):
        """(x + attention(norm(x)), ffn_norm of that): the residual stream and the FFN's input."""
        return add_norm(self.ffn_norm, *self.attention(x, rope, cache, pending))

    def dense_forward(self, x, rope, cache):
        """The whole block when its FFN is dense."""
        x, normed = self.attend(x, rope, cache)
        return x + self.ffn(normed)

    def forward(self, x, rope, cache, inference: bool, groups: TokenGroups | None = None,
                route_logits: torch.Tensor | None = None):
        compiled = cache is None and compiles_dense(self.backends.dense)
        if not isinstance(self.ffn, MoELayer):
            run = _compiled(Block.dense_forward) if compiled else Block.dense_forward
            return run(self, x, rope, cache), None
        attend = _compiled(Block.attend) if compiled else Block.attend
        x, normed = attend(self, x, rope, cache)
        h, routing = self.ffn(normed, inference, groups, route_logits)
        return x + h, routing

    def forward_deferred(self, x, pending, rope, cache, inference: bool,
                         groups: TokenGroups | None = None,
                         route_logits: torch.Tensor | None = None):
        """forward() with the residual adds moved into the norms that follow them, for calls
        autograd does not record: returns (x, h, routing) where the block's output is x + h,
        and `pending` is the previous block's h (None for the first block), added to x by this
        block's first norm (add_norm: one Triton pass where the norm takes that path, else the
        plain add and norm, the same values as forward). A MoE FFN's h may be a PendingCombine
        (moeflow.model.dispatch), its combine then done in that same pass. Saves one add
        kernel per block: a 2048-token prefill of the Qwen3-30B-A3B shape on the H200 ran 47
        kernels and 0.15 ms of kernel time fewer (not visible in its wall time,
        benchmarks/results/prefill). Before a MoE FFN the add + norm after the attention is
        left to the MoE router (norms.pending_add_norm), whose decode kernel computes it with
        the routing logits: one launch fewer per decode layer."""
        x, attended = self.attention(x, rope, cache, pending)
        if isinstance(self.ffn, MoELayer):
            # (Not under a forward pre-hook on the FFN: it would read the input unwritten.)
            norm_input = (None if self.ffn._forward_pre_hooks
                          else pending_add_norm(self.ffn_norm, x, attended))
            if norm_input is not None:
                x, normed = norm_input.s, norm_input.y
            else:
                x, normed = add_norm(self.ffn_norm, x, attended)
            return (x, *self.ffn(normed, inference, groups, route_logits, defer_combine=True,
                                 norm_input=norm_input))
        x, normed = add_norm(self.ffn_norm, x, attended)
        return x, self.ffn(normed), None


def _block_hooks(blocks: nn.ModuleList) -> bool:
    """Whether forward hooks (the blocks' own, or every module's) would see Block.forward."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or any(b._forward_hooks or b._forward_pre_hooks for b in blocks))


@functools.cache
def _compiled(fn):
    """torch.compile(fn), made once per process on first use (importing torch._dynamo costs
    about a second, which runs that never compile should not pay)."""
    return torch.compile(fn)


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2/Megatron init: N(0, std), output projections scaled by 1/sqrt(2·layers); norms to
    1, biases to 0. Shared by every network built from Blocks (the LM, the forecaster)."""
    out_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if p.is_meta:  # no values to set (parameter counts, shards built before loading)
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.fill_(1.0) if leaf == "weight" else p.zero_()
        elif leaf == "bias" or leaf.startswith("b_"):
            p.zero_()
        elif leaf == "w_out_EFD" or name.endswith(("attn.proj.weight", "fc_out.weight")):
            p.normal_(0.0, out_std)
        else:
            p.normal_(0.0, std)


class Transformer(nn.Module, ChoosesBackends):
    """`backends` chooses each op's implementation for every layer (moeflow.ops.backend);
    the default picks the fastest measured path for the device."""

    def __init__(self, config: ModelConfig, backends: Backends = Backends()) -> None:
        super().__init__()
        self.config = config
        self.backends = backends
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (nn.Embedding(config.max_seq_len, config.d_model)
                        if config.arch == "gpt" else None)
        self.blocks = nn.ModuleList(
            Block(config, i, spec, backends) for i, spec in enumerate(config.ffn_specs()))
        rope_dim = config.mla.qk_rope_head_dim if config.mla else config.head_dim
        self.rope = (RopeTables(rope_dim, config.rope_theta, config.max_seq_len)
                     if self.pos_emb is None else None)
        self.final_norm = make_norm(config.arch, config.d_model, config.norm_eps, backends)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Read by the offloading engine's prefetch only; the forward below never runs them.
        self.pregate = PregateHeads.of(config) if config.pregate else None
        self.lookahead = LookaheadRouter.of(config) if config.lookahead else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.config.init_std, self.config.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def set_backends(self, backends: Backends) -> None:
        """Replace the implementation choice of every layer (tests and benchmarks force paths)."""
        set_backends(self, backends)

    def update_expert_biases(self, counts_per_layer: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing step, given each MoE layer's expert counts for the step."""
        for layer, counts in zip(self.moe_layers(), counts_per_layer, strict=True):
            layer.router.update_expert_bias(counts)

    def lookahead_logits(self, input_ids: torch.Tensor, history: torch.Tensor | None
                         ) -> list[torch.Tensor]:
        """Every MoE layer's routing logits_TE from the lookahead router: input_ids [B, T] and
        history [B, C-1] (the ids before them, -1 for none; None: the inputs start their
        sequences)."""
        B = input_ids.shape[0]
        H = self.lookahead.history
        if history is None:
            history = torch.full((B, H), -1, dtype=torch.int64, device=input_ids.device)
        if tuple(history.shape) != (B, H):
            raise ValueError(f"history has shape {tuple(history.shape)}; the lookahead router "
                             f"needs the {H} token ids before each sequence's inputs, "
                             f"shape {(B, H)}")
        known_BH1 = (history >= 0)[..., None]
        hist_BHD = self.tok_emb(history.clamp_min(0)) * known_BH1
        return self.lookahead(self.tok_emb(input_ids), hist_BHD)

    @torch.no_grad()
    def lookahead_routing(self, input_ids: torch.Tensor, history: torch.Tensor | None
                          ) -> list[torch.Tensor]:
        """ids_TK of every MoE layer for these tokens, exactly as the forward will route them
        as served (the same logits through each layer's own routing), without running it."""
        logits = self.lookahead_logits(input_ids, history)
        return [m.router(None, inference=True, logits_TE=lg).ids_TK
                for m, lg in zip(self.moe_layers(), logits, strict=True)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The logits of the LM head's input h [..., D] (a forward's `hidden`): [..., V]."""
        return head_logits(h, self.lm_head.weight)

    def forward(self, input_ids: torch.Tensor, cache=None,
                logits_at: torch.Tensor | None = None, inference: bool = False,
                groups: torch.Tensor | None = None, history: torch.Tensor | None = None,
                own_routers: bool = False, hidden_only: bool = False,
                recompute: bool = False) -> ModelOutput:
        """input_ids [B, T]; `logits_at` [B, T'] picks the positions whose logits are returned
        (logits [B, T', V]); the cache, if given, supplies each token's position;
        `inference=True` routes dropless and without noise (see moeflow.model.router);
        `groups` [B, T]: each token's expert group id (checked here, one host sync);
        `history`, `own_routers`: models with a lookahead router (see the module docstring);
        `hidden_only`: return the LM head's input (final norm applied) as `hidden` and no
        logits (the trainer's fused head + loss, moeflow.ops.linear_cross_entropy);
        `recompute`: under autograd, checkpoint each block (torch.utils.checkpoint,
        non-reentrant: RNG and autocast replayed, so the recomputed activations are the same)."""
        B, T = input_ids.shape
        route_by = [None] * len(self.blocks)
        if self.lookahead is not None and not own_routers:
            if cache is not None and history is None and self.lookahead.history:
                raise ValueError("history: a cached forward of a model with a lookahead router "
                                 "must give the token ids before its inputs (-1 for none)")
            logits = iter(self.lookahead_logits(input_ids, history))
            route_by = [next(logits) if isinstance(b.ffn, MoELayer) else None
                        for b in self.blocks]
        token_group = None
        if groups is not None:
            names = self.config.router.expert_groups
            if not names:
                raise ValueError("groups: this model has no expert groups "
                                 "(router.expert_groups is empty)")
            if tuple(groups.shape) != (B, T):
                raise ValueError(f"groups has shape {tuple(groups.shape)}; it needs one group "
                                 f"id per token, the shape of input_ids {(B, T)}")
            token_group = token_groups(groups.to(input_ids.device), B * T, len(names))
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len "
                                 f"{self.config.max_seq_len}")
            positions = None  # 0..T-1
        else:
            positions = cache.positions(T, input_ids.device)
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=input_ids.device)[None]
                                 if positions is None else positions)
        elif positions is None:
            rope = self.rope.first(T, input_ids.device, x.dtype)
        else:
            rope = self.rope.at(positions, x.dtype)
        stats, losses = [], []
        checkpointed = recompute and cache is None and torch.is_grad_enabled()
        # Without autograd each block leaves its residual add to the next norm (forward_deferred),
        # unless a forward hook watches a block: the hooks see forward's (x, routing).
        deferred = not torch.is_grad_enabled() and not _block_hooks(self.blocks)
        pending = None
        for i, block in enumerate(self.blocks):
            if checkpointed:
                x, routing = checkpoint(block, x, rope, None, inference, token_group, route_by[i],
                                        use_reentrant=False)
            elif deferred:
                x, pending, routing = block.forward_deferred(x, pending, rope, cache, inference,
                                                             token_group, route_by[i])
            else:
                x, routing = block(x, rope, cache, inference, token_group, route_by[i])
            if routing is not None:
                losses += [routing.loss, routing.aux_loss, routing.z_loss]
                stats.append(LayerRouting(i, routing.counts_E, routing.num_dropped,
                                          routing.ids_TK.numel(), routing.aux_loss,
                                          routing.z_loss, routing.ids_TK, routing.kept_TK))
        if pending is None:
            h = self.final_norm(x)
        else:  # the last block's output, added by the final norm's pass (the norm is per row)
            h = add_norm(self.final_norm, x, pending)[1]
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        out = ModelOutput(None if hidden_only else self.head(h),
                          tuple(losses), tuple(stats),
                          h if hidden_only else None)
        if torch.is_grad_enabled():
            out.router_loss  # noqa: B018  (summed now, so autograd records it with the forward)
        return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters; a token activates top_k of each MoE layer's E experts."""
    expert_fraction = {id(layer.experts): layer.spec.router.top_k / layer.spec.num_experts
                       for layer in model.modules() if isinstance(layer, MoELayer)}
    total = active = 0
    seen: set[int] = set()
    for module in model.modules():
        fraction = expert_fraction.get(id(module), 1.0)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                active += round(p.numel() * fraction)
    return total, active


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of `config`, built on the meta device (nothing allocated)."""
    with torch.device("meta"), _SkipTorchInit():
        model = Transformer(config)
    return count_parameters(model)


class _SkipTorchInit(TorchFunctionMode):
    """torch.nn.init calls return their tensor untouched. torch's modules initialise themselves
    in their constructors; on meta tensors that sets nothing, yet `normal_` there goes through
    torch._refs, whose first use imports torch._dynamo (~1 s: most of `moeflow info`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))
