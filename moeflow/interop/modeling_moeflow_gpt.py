"""moeflow's GPT-family MoE as a transformers model: shipped inside every GPT-family HF export.

transformers has no class for the DeepSpeed-MoE paper's GPT models (LayerNorm, GELU, learned
positions, tied embeddings, MoE and Residual-MoE layers, per-layer expert counts), so
`moeflow convert --to hf` copies this file into the export and points config.json's `auto_map`
at it; transformers then loads the export with `trust_remote_code=True`:

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

(AutoTokenizer reads config.json too: without the flag transformers asks whether to run this
file, and either answer gives the same tokenizer, a `tokenizers` one named in
tokenizer_config.json.)

It imports only torch and transformers (written against transformers 5.24), never moeflow, so
an export runs where moeflow is not installed. config.json keeps the whole moeflow ModelConfig
under "moeflow" (the one source of truth; the usual HF names are derived from it), and the
tensors keep moeflow's names and layouts under a `model.` prefix (experts stacked: w_in_EDI
[E, D, F], w_out_EFD [E, F, D]), so converting back is a rename. The forward is the inference
path of moeflow.model.transformer: routing dropless and without noise (what `moeflow serve`
does), experts chosen as moeflow.model.router.select_experts chooses them, combined in the same
order; tests/test_convert.py checks logits and greedy text against moeflow.

Legend: B batch, T new tokens, S keys (cached + new), H query heads, G kv heads, hd head dim,
D model dim, E experts, K top-k, F expert ffn dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

_CACHE_FIELD = "cache" if any(f.name == "cache" for f in dataclasses.fields(
    CausalLMOutputWithPast)) else "past_key_values"


class MoeflowGPTConfig(PreTrainedConfig):
    """`moeflow`: moeflow's ModelConfig as a dict; the HF names below are derived from it."""

    model_type = "moeflow_gpt"

    moeflow: dict | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    max_position_embeddings: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        m = self.moeflow or {}
        if m:
            if m.get("arch") != "gpt":
                raise ValueError(f"moeflow.arch={m.get('arch')!r}: this class runs arch 'gpt'")
            self.vocab_size, self.hidden_size = m["vocab_size"], m["d_model"]
            self.num_hidden_layers, self.num_attention_heads = m["n_layers"], m["n_heads"]
            self.num_key_value_heads = m["n_kv_heads"]
            self.max_position_embeddings = m["max_seq_len"]
            self.tie_word_embeddings = bool(m["tie_embeddings"])
        super().__post_init__(**kwargs)


def _layer(entry: str) -> tuple[str, int]:
    kind, _, count = entry.partition(":")
    return kind, int(count or 0)


def _norm(m: dict, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=m["norm_eps"])


class RMSNorm(nn.Module):
    """Queries' and keys' norm (moeflow's qk_norm), in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Attention(nn.Module):
    def __init__(self, m: dict, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.G, self.hd = m["n_heads"], m["n_kv_heads"], m["head_dim"]
        self.qkv = nn.Linear(m["d_model"], (self.H + 2 * self.G) * self.hd, bias=m["attn_bias"])
        self.proj = nn.Linear(self.H * self.hd, m["d_model"], bias=m["attn_out_bias"])
        self.full_qk_norm = m["qk_norm"] and m["qk_norm_scope"] == "full"
        q_dim = self.H * self.hd if self.full_qk_norm else self.hd
        k_dim = self.G * self.hd if self.full_qk_norm else self.hd
        self.q_norm = RMSNorm(q_dim, m["norm_eps"]) if m["qk_norm"] else None
        self.k_norm = RMSNorm(k_dim, m["norm_eps"]) if m["qk_norm"] else None

    def forward(self, x_BTD: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, hd = self.H, self.G, self.hd
        q, k, v = self.qkv(x_BTD).split([H * hd, G * hd, G * hd], dim=-1)
        if self.full_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTd = q.view(B, T, H, hd).transpose(1, 2)
        k_BGSd = k.view(B, T, G, hd).transpose(1, 2)
        v_BGSd = v.view(B, T, G, hd).transpose(1, 2)
        if self.q_norm is not None and not self.full_qk_norm:
            q_BHTd, k_BGSd = self.q_norm(q_BHTd), self.k_norm(k_BGSd)
        if cache is not None:
            k_BGSd, v_BGSd = cache.update(k_BGSd, v_BGSd, self.layer_idx)
        causal = mask is None and T > 1 and k_BGSd.shape[2] == T
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask,
                                                is_causal=causal, enable_gqa=G != H)
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, H * hd))


class Router(nn.Module):
    """moeflow's inference routing: fp32 scores, top-k, kept weights renormalised and scaled."""

    def __init__(self, d_model: int, num_experts: int, r: dict) -> None:
        super().__init__()
        self.r, self.E = r, num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        if r["expert_bias"]:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _select(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        r, K = self.r, self.r["top_k"]
        if r["score_func"] == "softmax" and self.expert_bias is None and r["num_groups"] == 1:
            # DeepSpeed's rule: first choice by probability, later ones by logits
            first_T = scores_TE.argmax(dim=-1)
            ids, taken_TE = [first_T], F.one_hot(first_T, self.E).bool()
            for _ in range(K - 1):
                nxt_T = logits_TE.masked_fill(taken_TE, float("-inf")).argmax(dim=-1)
                ids.append(nxt_T)
                taken_TE = taken_TE | F.one_hot(nxt_T, self.E).bool()
            return torch.stack(ids, dim=1)
        sel_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        groups = r["num_groups"]
        if groups > 1:
            T = sel_TE.shape[0]
            grouped = sel_TE.view(T, groups, self.E // groups)
            if r["group_score"] == "max":
                best = grouped.max(dim=-1).values
            else:
                best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.sort(best, dim=-1, descending=True, stable=True).indices
            mask = torch.zeros(T, groups, dtype=torch.bool, device=sel_TE.device)
            mask.scatter_(1, keep[:, :r["topk_groups"]], True)
            sel_TE = torch.where(mask[:, :, None], grouped, float("-inf")).view(T, self.E)
        return torch.sort(sel_TE, dim=-1, descending=True, stable=True).indices[:, :K]

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        big = torch.finfo(logits_TE.dtype).max
        logits_TE = torch.nan_to_num(logits_TE, nan=-big, posinf=big, neginf=-big)
        scores_TE = (logits_TE.softmax(dim=-1) if r["score_func"] == "softmax"
                     else logits_TE.sigmoid())
        ids_TK = self._select(logits_TE, scores_TE)
        weights_TK = scores_TE.gather(1, ids_TK)
        normalize = r["top_k"] >= 2 if r["normalize_topk"] is None else r["normalize_topk"]
        if normalize:  # None: DeepSpeed's rule
            eps = torch.finfo(torch.float32).eps
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(eps)
        return ids_TK, weights_TK * r["routed_scaling"]


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.w_in_EDI = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in_EI = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
                ) -> torch.Tensor:
        T, K = ids_TK.shape
        y_TKD = x_TD.new_zeros(T, K, x_TD.shape[-1])
        for e in torch.unique(ids_TK).tolist():
            tok, slot = torch.nonzero(ids_TK == e, as_tuple=True)
            h = x_TD[tok] @ self.w_in_EDI[e]
            if self.b_in_EI is not None:
                h = h + self.b_in_EI[e]
            y = F.gelu(h) @ self.w_out_EFD[e]
            if self.b_out_ED is not None:
                y = y + self.b_out_ED[e]
            y_TKD[tok, slot] = y
        return (y_TKD * weights_TK.to(y_TKD.dtype)[..., None]).sum(dim=1)


class MoE(nn.Module):
    """Experts, plus shared experts (an always-on MLP, optionally gated) or, for Residual-MoE
    layers, a fixed MLP mixed per token by softmax(residual_coef(x))."""

    def __init__(self, m: dict, kind: str, num_experts: int) -> None:
        super().__init__()
        D, bias = m["d_model"], m["mlp_bias"]
        self.router = Router(D, num_experts, m["router"])
        self.experts = Experts(num_experts, D, m["expert_d_ff"], bias)
        self.shared = MLP(D, m["shared_d_ff"], bias) if m["shared_d_ff"] else None
        self.shared_gate = nn.Linear(D, 1, bias=False) if m["shared_expert_gate"] else None
        residual = kind == "residual_moe"
        self.residual_mlp = MLP(D, m["d_ff"], bias) if residual else None
        self.residual_coef = nn.Linear(D, 2) if residual else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        y_TD = self.experts(x_TD, *self.router(x_TD))
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD
        if self.residual_mlp is not None:
            coef_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + self.residual_mlp(x_TD) * coef_T2[:, 1:]
        return y_TD.view_as(x_BTD)


class Block(nn.Module):
    def __init__(self, m: dict, layer_idx: int) -> None:
        super().__init__()
        kind, experts = _layer(m["ffn_layout"][layer_idx])
        self.attn_norm = _norm(m, m["d_model"])
        self.attn = Attention(m, layer_idx)
        self.ffn_norm = _norm(m, m["d_model"])
        self.ffn = (MLP(m["d_model"], m["d_ff"], m["mlp_bias"]) if kind == "dense"
                    else MoE(m, kind, experts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class MoeflowGPTPreTrainedModel(PreTrainedModel):
    config_class = MoeflowGPTConfig
    config: MoeflowGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    # moeflow's pre-gate heads (offloading prefetch), exported with the model; not in the forward
    _keys_to_ignore_on_load_unexpected = [r"^model\.pregate\."]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Experts):
            std = self.config.moeflow["init_std"]
            for p in (module.w_in_EDI, module.w_out_EFD):
                if not getattr(p, "_is_hf_initialized", False):
                    with torch.no_grad():
                        p.normal_(0.0, std)


class MoeflowGPTModel(MoeflowGPTPreTrainedModel):
    def __init__(self, config: MoeflowGPTConfig) -> None:
        super().__init__(config)
        m = config.moeflow
        self.tok_emb = nn.Embedding(m["vocab_size"], m["d_model"])
        self.pos_emb = nn.Embedding(m["max_seq_len"], m["d_model"])
        self.blocks = nn.ModuleList(Block(m, i) for i in range(m["n_layers"]))
        self.final_norm = _norm(m, m["d_model"])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tok_emb = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        pad_mask_BS = None
        if attention_mask is not None and attention_mask.dim() == 2 and \
                not bool(attention_mask[:, -S:].all()):
            pad_mask_BS = attention_mask[:, -S:].bool()
        if position_ids is None:
            if pad_mask_BS is None:
                position_ids = torch.arange(past, S, device=input_ids.device)[None]
            else:  # left padding: positions count the real tokens only
                position_ids = (pad_mask_BS.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        if int(position_ids.max()) >= self.config.moeflow["max_seq_len"]:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_seq_len "
                             f"{self.config.moeflow['max_seq_len']} (learned positions)")
        mask = None
        if pad_mask_BS is not None or (T > 1 and past > 0):
            q_pos = torch.arange(past, S, device=input_ids.device)
            mask = q_pos[:, None] >= torch.arange(S, device=input_ids.device)[None]  # [T, S]
            mask = mask[None, None].expand(B, 1, T, S)
            if pad_mask_BS is not None:
                mask = mask & pad_mask_BS[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)  # padded queries: any output, never NaN
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x, mask, cache)
        return self.final_norm(x)


class MoeflowGPTForCausalLM(MoeflowGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: MoeflowGPTConfig) -> None:
        super().__init__(config)
        self.model = MoeflowGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_BTD = self.model(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        logits = self.lm_head(hidden_BTD)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})


__all__ = ["MoeflowGPTConfig", "MoeflowGPTForCausalLM", "MoeflowGPTModel"]
