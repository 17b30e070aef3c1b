"""What the network is: frozen, validated, serialisable model configuration.

A `ModelConfig` describes one decoder: its architecture family (`gpt`, the DeepSpeed-MoE paper's
GPT-3-style model, or `llama`: RMSNorm, RoPE, SwiGLU, grouped-query attention), its sizes, and
what each layer's FFN is. Defaults that depend on other fields (`d_ff`, `n_kv_heads`, ...) are
resolved at construction, so a config written to JSON reads back equal.

Layer layout. `ffn_layout` is the one source of truth: one entry per layer, "dense", "moe:E" or
"residual_moe:E" (E experts in that layer), so any mix is expressible: PR-MoE pyramids, HF Qwen's
`mlp_only_layers`, DeepSeek's dense first layers. Most models follow a regular pattern, so the
older interval shorthand stays: `moe_every`, `first_moe_layer`, `num_experts` (one count per MoE
layer) and `moe_kind` (Megatron-DeepSpeed's expert interval). When `ffn_layout` is omitted it is
derived from the shorthand, so old config files and presets load unchanged; when it is given
with `moe_every=0`, `num_experts` and `moe_kind` are derived from it instead (`moe_kind` is
"mixed" when MoE and Residual-MoE layers are combined). Given both ways, they must agree.
`ffn_specs()`, `moe_layer_indices()` and the model itself read only `ffn_layout`.

Invalid values raise `ValueError` naming the field and the value, at construction.
How a run trains the model lives elsewhere (the trainer's run config), not here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeflow.presets import PRESET_FIELDS
from moeflow.validate import check, choice, integer, number

ARCHS = ("gpt", "llama")
MOE_KINDS = ("moe", "residual_moe")
MIXED = "mixed"  # moe_kind of a layout that combines both MoE kinds
INTERVAL_FIELDS = ("moe_every", "first_moe_layer", "num_experts", "moe_kind")
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "random")
NOISE_KINDS = ("none", "jitter", "rsample", "rsample_second")
AUX_CHOICES = ("first", "all")
GROUP_SCORES = ("top2_sum", "max")
QK_NORM_SCOPES = ("head", "full")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts: DeepSpeed-MoE's gating by default, plus later refinements.

    top_k: experts per token. score_func: softmax over experts or per-expert sigmoid (fp32).
    capacity_factor / eval_capacity_factor: slots per expert (see `capacity`);
    eval_capacity_factor=None routes dropless in eval mode (what a served model does).
    dropless: never drop (capacity ignored). drop_policy: which over-capacity tokens go —
    "position" keeps the earliest tokens, "random" is Random Token Selection.
    noise (training only): "jitter" multiplies router inputs by U(1-eps, 1+eps); "rsample" adds
    Gumbel noise to the logits that pick every choice; "rsample_second" adds it only to the
    logits that pick the 2nd..k-th choice (DeepSpeed top-2's `top2_2nd_expert_sampling`, which
    DeepSpeed also applies at eval; moeflow keeps eval deterministic).
    normalize_topk: divide each token's kept weights by their sum (clamped at fp32 eps), so the
    routes that survived capacity carry all of the token's weight; None = DeepSpeed's rule
    (normalise when top_k >= 2, raw probabilities for top-1). routed_scaling multiplies the
    weights (DeepSeek-V3). aux_loss_choices: which assignments make the balance loss's f_e —
    "first" choices only or "all" k; None = DeepSpeed's rule ("first" for top-2, "all" else).
    num_groups / topk_groups: group-limited routing (DeepSeek-V2/V3); group_score ranks groups
    by the sum of their two best scores ("top2_sum", DeepSeek-V3) or their best ("max", V2).
    expert_bias: aux-loss-free balancing bias added to selection scores only, moved by
    bias_update_rate per step towards balance. aux_loss_coef / z_loss_coef weight the losses;
    a loss whose coefficient is 0 is a statistic only (never in the objective or its gradient).
    expert_groups: modality/task expert groups (MoMa, JiuZhang 2.0), ((name, experts), ...): the
    layer's experts split into named groups of contiguous global ids, in order; each token
    carries a group id (`model(ids, groups=...)`, 0 when absent) and is routed only inside its
    group (moeflow.model.expert_groups has the rules for capacity and the balance loss). Empty:
    one pool. Not to be confused with num_groups, DeepSeek's group-limited routing, which picks
    groups per token by score; the two do not combine.

    Which expert a token picks (moeflow.model.router.select_experts): with softmax scores and no
    bias or groups, the first choice is the arg-max probability and later choices the arg-max
    logits among the experts not yet chosen, as DeepSpeed's top1gating/top2gating do (logits
    still order experts whose probabilities underflow to equal values); ties go to the lower
    index. Sigmoid scores, expert bias or groups select by the (biased) scores (DeepSeek).
    Queue priority is choice-major (every first choice before any second choice), as DeepSpeed's
    top-2; DeepSpeed's k >= 3 `topkgating` queues token-major instead (a deliberate difference:
    choice-major keeps first choices when capacity is short).
    """

    top_k: int = 1
    score_func: str = "softmax"
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = 1.0
    min_capacity: int = 4
    dropless: bool = False
    drop_policy: str = "position"
    noise: str = "none"
    noise_eps: float = 1e-2
    normalize_topk: bool | None = None
    routed_scaling: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_choices: str | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    expert_groups: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        integer("router.top_k", self.top_k, lo=1)
        choice("router.score_func", self.score_func, SCORE_FUNCS)
        number("router.capacity_factor", self.capacity_factor, lo=0, lo_open=True)
        check(self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
              "router.eval_capacity_factor", self.eval_capacity_factor,
              "must be > 0 (or null: dropless in eval mode)")
        integer("router.min_capacity", self.min_capacity, lo=0)
        choice("router.drop_policy", self.drop_policy, DROP_POLICIES)
        choice("router.noise", self.noise, NOISE_KINDS)
        number("router.noise_eps", self.noise_eps, lo=0, hi=1, hi_open=True)
        number("router.routed_scaling", self.routed_scaling, lo=0, lo_open=True)
        integer("router.num_groups", self.num_groups, lo=1)
        integer("router.topk_groups", self.topk_groups, lo=1, hi=self.num_groups)
        choice("router.group_score", self.group_score, GROUP_SCORES)
        if self.aux_loss_choices is not None:
            choice("router.aux_loss_choices", self.aux_loss_choices, AUX_CHOICES)
        for name in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            number(f"router.{name}", getattr(self, name), lo=0)
        object.__setattr__(self, "expert_groups", _parse_expert_groups(self.expert_groups))
        if self.expert_groups:
            check(self.num_groups == 1, "router.num_groups", self.num_groups,
                  "must be 1 with expert_groups (group-limited routing does not combine with "
                  "expert groups)")
            smallest = min(n for _, n in self.expert_groups)
            check(self.top_k <= smallest, "router.top_k", self.top_k,
                  f"must be <= the smallest expert group's experts ({smallest})")

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Experts per expert group, in order (empty: one pool)."""
        return tuple(n for _, n in self.expert_groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.expert_groups)

    @property
    def normalizes(self) -> bool:
        """Whether kept weights are renormalised (normalize_topk, or DeepSpeed's rule)."""
        return self.top_k >= 2 if self.normalize_topk is None else self.normalize_topk

    @property
    def balance_on_first_choice(self) -> bool:
        """Whether the balance loss counts first choices only (aux_loss_choices, or DeepSpeed's
        rule: its top2gating counts first choices, top1gating and topkgating all choices)."""
        if self.aux_loss_choices is None:
            return self.top_k == 2
        return self.aux_loss_choices == "first"

    def capacity(self, num_tokens: int, num_experts: int, training: bool) -> int | None:
        """Slots per expert for `num_tokens` tokens, or None when routing is dropless.

        DeepSpeed's `_capacity`: ceil(fp32(T/E) · fp32(factor·k)) with an fp32 product, at least
        min_capacity. The result is clamped to T: an expert can hold at most T of one batch's
        assignments (a token picks an expert once), so the clamp changes no decision and only
        keeps capacity-sized buffers small."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if self.dropless or factor is None:
            return None
        product = np.float32(num_tokens / num_experts) * np.float32(factor * self.top_k)
        cap = math.ceil(float(product))
        return min(max(cap, self.min_capacity), num_tokens)


def _parse_expert_groups(groups: Any) -> tuple[tuple[str, int], ...]:
    """((name, experts), ...) from a tuple or a JSON/YAML list of [name, experts] pairs."""
    need = "must be a list of [name, number of experts] pairs with distinct names"
    check(isinstance(groups, (list, tuple)), "router.expert_groups", groups, need)
    out = []
    for pair in groups:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        check(ok and isinstance(pair[0], str) and pair[0] != "", "router.expert_groups",
              groups, need)
        integer(f"router.expert_groups[{pair[0]!r}]", pair[1], lo=1)
        out.append((pair[0], pair[1]))
    check(len({name for name, _ in out}) == len(out), "router.expert_groups", groups, need)
    return tuple(out)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a low-rank latent.

    q_lora_rank: rank of the query's low-rank path (0 = a full-rank query projection).
    kv_lora_rank: rank of the key/value latent. Each head's query/key is qk_nope_head_dim
    position-free dims followed by qk_rope_head_dim rotary dims (the rotary key is shared by all
    heads); values have v_head_dim dims.
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        integer("mla.q_lora_rank", self.q_lora_rank, lo=0)
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            integer(f"mla.{name}", getattr(self, name), lo=1)
        check(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
              "mla.qk_rope_head_dim", self.qk_rope_head_dim, "must be even and >= 2")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _parse_layer(i: int, entry: Any) -> tuple[str, int]:
    """("dense", 0) or (kind, number of experts) for the entry ffn_layout[i]."""
    name = f"ffn_layout[{i}]"
    check(isinstance(entry, str), name, entry, "must be 'dense', 'moe:E' or 'residual_moe:E'")
    if entry == "dense":
        return "dense", 0
    kind, sep, count = entry.partition(":")
    check(kind in MOE_KINDS and sep == ":", name, entry,
          "must be 'dense', 'moe:E' or 'residual_moe:E'")
    check(count.isascii() and count.isdigit() and count == str(int(count)) and int(count) >= 1,
          name, entry, "the expert count E must be an integer >= 1")
    return kind, int(count)


@dataclass(frozen=True)
class FFNSpec:
    """One layer's feed-forward block, derived from a ModelConfig by `ffn_specs()`."""

    kind: str  # "dense" | "moe" | "residual_moe"
    d_ff: int  # width of the dense MLP (dense layers and the Residual-MoE's fixed branch)
    num_experts: int = 0
    expert_d_ff: int = 0
    num_shared_experts: int = 0
    shared_d_ff: int = 0
    shared_expert_gate: bool = False
    router: RouterConfig | None = None

    @property
    def is_moe(self) -> bool:
        return self.kind != "dense"


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose FFN layers may be dense, MoE or Residual-MoE.

    FFN layout: ffn_layout[i] is layer i's FFN, "dense", "moe:E" or "residual_moe:E". The interval
    shorthand makes layer i (0-based) an MoE layer of kind moe_kind when moe_every > 0,
    i >= first_moe_layer and (i - first_moe_layer) % moe_every == 0; the default
    first_moe_layer = moe_every - 1 places experts on every other layer starting at the second,
    as Megatron-DeepSpeed's expert interval does. num_experts has one entry per MoE layer (an int
    means the same count everywhere). The width and shared experts of every MoE layer come from
    expert_d_ff, num_shared_experts, shared_d_ff and shared_expert_gate; dense layers use d_ff.

    Attention details for imported architectures: attn_bias is the q/k/v projection's bias and
    attn_out_bias the output projection's (default: same as attn_bias; Qwen2-MoE has one without
    the other). qk_norm normalises queries and keys per head (qk_norm_scope "head", Qwen3) or over
    the whole projection ("full", OLMoE). rope_interleave rotates adjacent pairs of dims instead
    of the two halves (DeepSeek). mla switches to multi-head latent attention.

    pregate: the network also carries pre-gate heads (moeflow.model.pregate), one per MoE layer
    but the last, predicting the next MoE layer's experts; the forward never runs them.
    pregate_rank: their width: 0 = a linear map, R > 0 = the linear map plus a rank-R MLP.
    pregate_depth: that MLP's hidden layers (1 or 2; checkpoints saved before it existed are 1).
    lookahead: C > 0 gives the network a decoupled lookahead router (Read-ME, moeflow.model.
    lookahead) that computes every MoE layer's routing logits from token ids alone (each token
    and the C-1 before it), and every MoE layer routes by them instead of by its own router;
    0: no lookahead router. lookahead_rank: its MLP's width (0: a linear map of the window).
    """

    name: str = "custom"
    arch: str = "gpt"
    vocab_size: int = 50257
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 16
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    rope_interleave: bool = False
    attn_bias: bool | None = None
    attn_out_bias: bool | None = None
    mlp_bias: bool | None = None
    tie_embeddings: bool | None = None
    init_std: float = 0.02
    ffn_layout: tuple[str, ...] | None = None
    moe_kind: str | None = None
    moe_every: int = 0
    first_moe_layer: int | None = None
    num_experts: tuple[int, ...] | int = ()
    expert_d_ff: int | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)
    mla: MLAConfig | None = None
    pregate: bool = False
    pregate_rank: int = 0
    pregate_depth: int = 1
    lookahead: int = 0
    lookahead_rank: int = 0

    def __post_init__(self) -> None:
        def resolve(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        choice("arch", self.arch, ARCHS)
        gpt = self.arch == "gpt"
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            integer(name, getattr(self, name), lo=1)
        if self.n_kv_heads is None:
            resolve("n_kv_heads", self.n_heads)
        check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
              self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                  f"must be divisible by n_heads={self.n_heads}")
            resolve("head_dim", self.d_model // self.n_heads)
        integer("head_dim", self.head_dim, lo=1)
        check(gpt or self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for RoPE")
        if self.d_ff is None:
            resolve("d_ff", 4 * self.d_model)
        integer("d_ff", self.d_ff, lo=1)
        number("norm_eps", self.norm_eps, lo=0, lo_open=True)
        number("init_std", self.init_std, lo=0, lo_open=True)
        for name in ("attn_bias", "mlp_bias", "tie_embeddings"):
            if getattr(self, name) is None:
                resolve(name, gpt)
        if self.attn_out_bias is None:
            resolve("attn_out_bias", self.attn_bias)
        choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if isinstance(self.router, dict):
            resolve("router", RouterConfig(**self.router))
        if isinstance(self.mla, dict):
            resolve("mla", MLAConfig(**self.mla))
        if self.mla is not None:
            check(not gpt, "mla", self.mla, "needs arch 'llama'")
            check(not self.qk_norm, "qk_norm", self.qk_norm, "is not used with mla")

        self._resolve_layout(resolve)
        if self.router.expert_groups:
            check(bool(self.num_experts), "router.expert_groups",
                  [list(g) for g in self.router.expert_groups], "needs MoE layers to route in")
            total = sum(self.router.group_sizes)
            check(all(e == total for e in self.num_experts), "router.expert_groups",
                  [list(g) for g in self.router.expert_groups],
                  f"must split every MoE layer's experts: they sum to {total} but the layers "
                  f"have {list(self.num_experts)} experts")
        for e in self.num_experts:
            check(self.router.top_k <= e, "router.top_k", self.router.top_k,
                  f"must be <= num_experts ({e})")
            check(e % self.router.num_groups == 0, "router.num_groups", self.router.num_groups,
                  f"must divide num_experts ({e})")
            if self.router.num_groups > 1:
                per_group = e // self.router.num_groups
                check(self.router.top_k <= self.router.topk_groups * per_group, "router.top_k",
                      self.router.top_k, "exceeds the experts in the selected groups")
        if self.expert_d_ff is None:
            resolve("expert_d_ff", self.d_ff)
        integer("expert_d_ff", self.expert_d_ff, lo=1)
        integer("num_shared_experts", self.num_shared_experts, lo=0)
        if self.shared_d_ff is None:
            resolve("shared_d_ff", self.num_shared_experts * self.expert_d_ff)
        integer("shared_d_ff", self.shared_d_ff, lo=0)
        check(self.num_shared_experts > 0 or not self.shared_expert_gate, "shared_expert_gate",
              self.shared_expert_gate, "needs num_shared_experts > 0")
        check(not self.pregate or len(self.num_experts) >= 2, "pregate", self.pregate,
              "needs at least two MoE layers (a head predicts the next one's routing)")
        integer("pregate_rank", self.pregate_rank, lo=0)
        check(self.pregate or self.pregate_rank == 0, "pregate_rank", self.pregate_rank,
              "needs pregate=True")
        integer("pregate_depth", self.pregate_depth, lo=1)
        check(self.pregate_depth == 1 or self.pregate_rank > 0, "pregate_depth",
              self.pregate_depth, "needs pregate_rank > 0 (a linear head has no hidden layers)")
        integer("lookahead", self.lookahead, lo=0)
        integer("lookahead_rank", self.lookahead_rank, lo=0)
        check(self.lookahead > 0 or self.lookahead_rank == 0, "lookahead_rank",
              self.lookahead_rank, "needs lookahead > 0")
        if self.lookahead:
            check(len(self.num_experts) >= 1, "lookahead", self.lookahead,
                  "needs at least one MoE layer (it routes the MoE layers)")
            check(not self.pregate, "lookahead", self.lookahead,
                  "and pregate both predict routing; a lookahead model's routing is known "
                  "before the forward, so it needs no pre-gate heads")
            check(not self.router.expert_groups, "lookahead", self.lookahead,
                  "is not built for models with expert groups")

    def _resolve_layout(self, resolve: Callable[[str, Any], None]) -> None:
        """Set ffn_layout from the interval fields, or num_experts and moe_kind from ffn_layout."""
        integer("moe_every", self.moe_every, lo=0)
        if self.first_moe_layer is None:
            resolve("first_moe_layer", max(self.moe_every - 1, 0))
        experts = self.num_experts
        if isinstance(experts, list):
            experts = tuple(experts)
        layout, layers = self.ffn_layout, None
        if layout is not None:
            check(isinstance(layout, (list, tuple)), "ffn_layout", layout,
                  "must be a list with one entry per layer")
            layout = tuple(layout)
            check(len(layout) == self.n_layers, "ffn_layout", layout,
                  f"needs one entry per layer (n_layers={self.n_layers}), got {len(layout)}")
            layers = [_parse_layer(i, entry) for i, entry in enumerate(layout)]
            resolve("ffn_layout", layout)

        if self.moe_every > 0 or layout is None:  # the interval shorthand decides
            kind = "moe" if self.moe_kind is None else self.moe_kind
            choice("moe_kind", kind, MOE_KINDS)
            check(0 <= self.first_moe_layer < self.n_layers or self.moe_every == 0,
                  "first_moe_layer", self.first_moe_layer,
                  f"must be in [0, n_layers={self.n_layers})")
            moe_layers = range(self.first_moe_layer, self.n_layers, self.moe_every) \
                if self.moe_every else range(0)
            n_moe = len(moe_layers)
            if isinstance(experts, int):
                check(n_moe > 0 or experts == 0, "num_experts", experts,
                      "makes no layer MoE without moe_every (1: every layer, 2: every other) "
                      "or an ffn_layout")
                experts = (experts,) * n_moe
            check(len(experts) == n_moe, "num_experts", experts,
                  f"needs one entry per MoE layer ({n_moe} MoE layers)")
            for e in experts:
                check(isinstance(e, int) and e >= 1, "num_experts", experts,
                      "entries must be >= 1")
            derived = ["dense"] * self.n_layers
            for i, e in zip(moe_layers, experts):
                derived[i] = f"{kind}:{e}"
            if layout is not None and layout != tuple(derived):
                i = next(i for i, (a, b) in enumerate(zip(layout, derived)) if a != b)
                raise ValueError(
                    f"ffn_layout[{i}]={layout[i]!r} disagrees with moe_every={self.moe_every}, "
                    f"first_moe_layer={self.first_moe_layer}, num_experts={experts!r}, "
                    f"moe_kind={kind!r}, which make layer {i} {derived[i]!r}; give one or the "
                    f"other, or make them agree")
            resolve("ffn_layout", tuple(derived))
            resolve("moe_kind", kind)
            resolve("num_experts", experts)
            return

        counts = tuple(e for kind, e in layers if kind != "dense")
        kinds = sorted({kind for kind, _ in layers if kind != "dense"})
        if isinstance(experts, int):
            experts = (experts,) * len(counts)
        if experts and experts != counts:
            raise ValueError(f"num_experts={experts!r} disagrees with ffn_layout, whose MoE "
                             f"layers have {counts!r} experts")
        if not kinds:
            kind = "moe" if self.moe_kind is None else self.moe_kind
            choice("moe_kind", kind, MOE_KINDS)
        else:
            kind = kinds[0] if len(kinds) == 1 else MIXED
            if self.moe_kind is not None and self.moe_kind != kind:
                raise ValueError(f"moe_kind={self.moe_kind!r} disagrees with ffn_layout, whose "
                                 f"MoE layers are {kind!r}")
        resolve("moe_kind", kind)
        resolve("num_experts", counts)

    # ---- derived structure -------------------------------------------------------------

    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, entry in enumerate(self.ffn_layout) if entry != "dense")

    def ffn_specs(self) -> tuple[FFNSpec, ...]:
        specs = []
        for i, entry in enumerate(self.ffn_layout):
            kind, num_experts = _parse_layer(i, entry)
            if kind == "dense":
                specs.append(FFNSpec(kind="dense", d_ff=self.d_ff))
                continue
            specs.append(FFNSpec(
                kind=kind,
                d_ff=self.d_ff,
                num_experts=num_experts,
                expert_d_ff=self.expert_d_ff,
                num_shared_experts=self.num_shared_experts,
                shared_d_ff=self.shared_d_ff,
                shared_expert_gate=self.shared_expert_gate,
                router=self.router,
            ))
        return tuple(specs)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layer_indices())

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied; derived defaults are re-resolved when their inputs change.

        A new `ffn_layout` alone replaces the interval fields; a new `moe_every` alone replaces
        an explicit `ffn_layout`.
        """
        base = _unresolved(self)
        if "ffn_layout" in changes and not any(f in changes for f in INTERVAL_FIELDS):
            base.update(moe_every=0, first_moe_layer=None, num_experts=(), moe_kind=None)
        elif changes.get("moe_every") and "ffn_layout" not in changes:
            base["ffn_layout"] = None
        return ModelConfig.from_dict({**base, **changes})

    # ---- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ffn_layout"] = list(self.ffn_layout)
        d["num_experts"] = list(self.num_experts)
        d["router"]["expert_groups"] = [list(g) for g in self.router.expert_groups]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field {unknown[0]!r}")
        data = dict(data)
        router = data.get("router", {})
        if not isinstance(router, (dict, RouterConfig)):
            raise ValueError(f"router={router!r}: must be a mapping of router settings")
        if isinstance(router, dict):
            known_r = {f.name for f in dataclasses.fields(RouterConfig)}
            bad = sorted(set(router) - known_r)
            if bad:
                raise ValueError(f"unknown router config field {bad[0]!r}")
            data["router"] = RouterConfig(**router)
        mla = data.get("mla")
        if mla is not None and not isinstance(mla, (dict, MLAConfig)):
            raise ValueError(f"mla={mla!r}: must be a mapping of MLA settings (or null)")
        if isinstance(mla, dict):
            known_m = {f.name for f in dataclasses.fields(MLAConfig)}
            bad = sorted(set(mla) - known_m)
            if bad:
                raise ValueError(f"unknown mla config field {bad[0]!r}")
            data["mla"] = MLAConfig(**mla)
        for name in ("num_experts", "ffn_layout"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        try:
            return cls(**data)
        except TypeError as e:  # wrong types reaching comparisons
            raise ValueError(f"malformed model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a JSON or YAML config file (YAML by suffix .yaml/.yml)."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a config file" if path.is_dir() else "does not exist"
            raise ValueError(f"config file {str(path)!r} {what}")
        text = path.read_text()
        yaml_file = path.suffix in (".yaml", ".yml")
        try:
            if yaml_file:
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is a malformed file
            raise ValueError(f"{path}: not valid {'YAML' if yaml_file else 'JSON'}: "
                             f"{_parse_error(e)}") from None
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """The preset called `name` (moeflow.presets)."""
        if name not in PRESET_FIELDS:
            raise ValueError(f"unknown preset {name!r}; known presets: "
                             f"{', '.join(PRESET_FIELDS)}")
        return cls.from_dict(PRESET_FIELDS[name])


def _parse_error(e: Exception) -> str:
    """One line saying where a JSON or YAML parser stopped: json's message already holds the
    line and column; PyYAML's holds them only on later lines, in its `problem_mark`."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        what = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return str(e).splitlines()[0]


def _unresolved(config: ModelConfig) -> dict[str, Any]:
    """Fields of `config` with derived defaults put back to None, so `replace` re-derives them."""
    d = config.to_dict()
    gpt = config.arch == "gpt"
    derived = {
        "n_kv_heads": config.n_heads,
        "head_dim": config.d_model // config.n_heads if config.d_model % config.n_heads == 0 else -1,
        "d_ff": 4 * config.d_model,
        "attn_bias": gpt, "mlp_bias": gpt, "tie_embeddings": gpt,
        "attn_out_bias": config.attn_bias,
        "first_moe_layer": max(config.moe_every - 1, 0),
        "expert_d_ff": config.d_ff,
        "shared_d_ff": config.num_shared_experts * config.expert_d_ff,
    }
    for name, default in derived.items():
        if d[name] == default:
            d[name] = None
    if config.moe_every > 0 or not config.is_moe:  # the interval fields derive the layout
        d["ffn_layout"] = None
        if len(set(config.num_experts)) == 1:
            d["num_experts"] = config.num_experts[0]
    else:  # the layout derives num_experts and moe_kind
        d["num_experts"] = ()
        d["moe_kind"] = None
    return d


# Every preset, built once (the presets' source is moeflow/presets.py, plain data).
PRESETS: dict[str, ModelConfig] = {name: ModelConfig.from_name(name) for name in PRESET_FIELDS}
