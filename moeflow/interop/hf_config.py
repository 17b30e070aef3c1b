"""HF transformers config.json ⇄ ModelConfig for the MoE architectures moeflow can run.

Supported `model_type`s: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3,
moeflow_gpt, moeflow's own GPT family as a remote-code transformers model (below), and the dense
llama and qwen2 (read only: what `moeflow upcycle` turns into an MoE). Each
reader maps the HF fields onto moeflow's (d_ff is the dense layers' width, expert_d_ff the
experts', shared experts become one MLP of width n_shared·moe_intermediate_size, ...). Anything
the model core cannot reproduce exactly is refused with a ValueError naming the field:
sliding-window attention, RoPE scaling (YaRN, linear, ...), quantized checkpoints, OLMoE's
clip_qkv, biased MLA projections, activations other than SiLU.

Which layers are MoE becomes `ffn_layout`, decided as transformers 5.x builds each decoder layer:
- Mixtral, OLMoE: every layer.
- Qwen2-MoE, Qwen3-MoE: layer i unless i is in mlp_only_layers, and only if num_experts > 0 and
  (i + 1) % decoder_sparse_step == 0 (both rules apply together). The dense layers are
  intermediate_size wide, the experts moe_intermediate_size.
- DeepSeek-V2/V3: layer i when i >= first_k_dense_replace (the class default when absent: 0 for
  V2, 3 for V3) and i % moe_layer_freq == 0. transformers ignores moe_layer_freq; DeepSeek's own
  modeling code, vLLM and SGLang apply it, and so do the checkpoints' tensor names. Every
  released DeepSeek-V2/V3 config has moe_layer_freq = 1, where all of them agree.

Exporting (`config_to_hf`) picks the HF architecture whose semantics match the moeflow config and
then checks the round trip: the config read back from the written dict must describe the same
network (same attention, same FFN layout, same routing); if not, the first field that differs is
named. Qwen's decoder_sparse_step and mlp_only_layers express any layout (the step that leaves
the fewest mlp_only_layers is written); DeepSeek's only dense-then-MoE, since transformers ignores
moe_layer_freq.

GPT-family models (arch="gpt": the DeepSpeed-MoE paper's models, `tiny`, what `moeflow demo` and
`moeflow reproduce` train) have no transformers class: LayerNorm + GELU + learned positions with
MoE and Residual-MoE layers and per-layer expert counts exist in no HF architecture. Mapping them
onto one (GPT-2 has no experts; every HF MoE model is RMSNorm + SwiGLU + RoPE) would change what
they compute, so they are exported as model_type "moeflow_gpt": config.json carries the whole
ModelConfig under "moeflow" and `auto_map` points at modeling_moeflow_gpt.py, which the export
ships beside the weights (transformers loads it with `trust_remote_code=True`). A remote-code
file rather than a class registered with AutoConfig.register when moeflow is imported: the
export then loads in any environment with transformers, without moeflow installed or imported,
the way HF hosts every architecture transformers lacks. Llama-family models with Residual-MoE
layers or per-layer expert counts stay refused: no HF class computes them, and the remote-code
class implements the GPT family only.

Pre-gate heads (`ModelConfig.pregate`, moeflow.model.pregate: the offloading engine's
predictors, not part of the forward) have no field in any HF architecture. A GPT-family export
carries them with the rest of the ModelConfig; an HF-family export (Mixtral, Qwen, ...) marks
them with the extra config.json key "moeflow_pregate" = {"rank": pregate_rank, plus "depth":
pregate_depth when it is not 1} (transformers keeps unknown keys and ignores them), and hf_weights stores their tensors under their moeflow names beside the HF ones:
moeflow reads both back, transformers loads the model without them.
A lookahead router (`ModelConfig.lookahead`) is refused: it decides the routing of every layer,
so an export without it would compute a different network.
"""

from __future__ import annotations

from typing import Any, Callable

from moeflow.config import MLAConfig, ModelConfig, RouterConfig

GPT_MODEL_TYPE = "moeflow_gpt"
PREGATE_KEY = "moeflow_pregate"  # an HF-family config.json key: the export holds pre-gate heads
HF_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                  GPT_MODEL_TYPE)
HF_DENSE_MODEL_TYPES = ("llama", "qwen2")  # read only (moeflow.interop.upcycle's sources)
HF_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    GPT_MODEL_TYPE: "MoeflowGPTForCausalLM",
}
# The remote-code file of GPT-family exports, copied from this directory into each one.
GPT_REMOTE_CODE = "modeling_moeflow_gpt.py"
GPT_AUTO_MAP = {"AutoConfig": "modeling_moeflow_gpt.MoeflowGPTConfig",
                "AutoModelForCausalLM": "modeling_moeflow_gpt.MoeflowGPTForCausalLM"}


def _refuse(model_type: str, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{model_type}: {field}={value!r} is not supported ({why})")


def _rope_theta(hf: dict, model_type: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        _refuse(model_type, "rope_type", kind, "only plain RoPE is implemented")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _common(hf: dict, model_type: str) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(model_type, "hidden_act", hf["hidden_act"], "experts are SwiGLU")
    if hf.get("quantization_config"):
        _refuse(model_type, "quantization_config", hf["quantization_config"].get("quant_method"),
                "quantized weights are not loaded")
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and model_type == "mixtral"):
        _refuse(model_type, "sliding_window", hf.get("sliding_window"), "full attention only")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    return dict(
        name=hf.get("_name_or_path") or model_type, arch="llama",
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=d_model,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, model_type),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=False, mlp_bias=False,
    )


def _router(hf: dict, **kw: Any) -> RouterConfig:
    """HF routers are dropless, renormalise only where the config says so, and balance over all
    k choices (transformers' load_balancing_loss_func)."""
    kw.setdefault("normalize_topk", False)
    return RouterConfig(top_k=hf["num_experts_per_tok"], dropless=True, aux_loss_choices="all",
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0) or 0.0, **kw)


def _num_experts(hf: dict, *keys: str) -> int:
    for key in keys:
        if hf.get(key):
            return hf[key]
    raise ValueError(f"config has none of {', '.join(keys)}")


def _layout(hf: dict, model_type: str, sparse: Callable[[int], bool], experts: int,
            fields: str) -> tuple[str, ...]:
    """ffn_layout with `experts` experts on the layers where `sparse(i)`; `fields` decide it."""
    layout = tuple(f"moe:{experts}" if sparse(i) else "dense"
                   for i in range(hf["num_hidden_layers"]))
    if all(entry == "dense" for entry in layout):
        raise ValueError(f"{model_type}: {fields} leave no MoE layer (a dense model is not an "
                         f"MoE checkpoint)")
    return layout


def _qwen_layout(hf: dict, model_type: str) -> tuple[str, ...]:
    step = hf.get("decoder_sparse_step")
    step = 1 if step is None else step
    if not isinstance(step, int) or step < 1:
        _refuse(model_type, "decoder_sparse_step", step, "must be an integer >= 1")
    mlp_only = hf.get("mlp_only_layers") or []
    experts = _num_experts(hf, "num_experts", "num_local_experts")
    return _layout(hf, model_type, lambda i: i not in mlp_only and (i + 1) % step == 0, experts,
                   f"decoder_sparse_step={step}, mlp_only_layers={mlp_only}")


def _mixtral(hf: dict) -> dict[str, Any]:
    c = _common(hf, "mixtral")
    width = hf["intermediate_size"]
    experts = _num_experts(hf, "num_local_experts")
    return {**c, "d_ff": width, "expert_d_ff": width,
            "ffn_layout": _layout(hf, "mixtral", lambda i: True, experts, "num_hidden_layers"),
            "router": _router(hf, normalize_topk=True)}


def _qwen2_moe(hf: dict) -> dict[str, Any]:
    c = _common(hf, "qwen2_moe")
    shared = hf.get("shared_expert_intermediate_size", 0)
    return {**c, "attn_bias": bool(hf.get("qkv_bias", True)),
            "attn_out_bias": False, "head_dim": c["d_model"] // c["n_heads"],
            "d_ff": hf["intermediate_size"], "expert_d_ff": hf["moe_intermediate_size"],
            "ffn_layout": _qwen_layout(hf, "qwen2_moe"),
            "num_shared_experts": 1 if shared else 0, "shared_d_ff": shared,
            "shared_expert_gate": bool(shared),
            "router": _router(hf, normalize_topk=bool(hf.get("norm_topk_prob", False)))}


def _qwen3_moe(hf: dict) -> dict[str, Any]:
    c = _common(hf, "qwen3_moe")
    bias = bool(hf.get("attention_bias", False))
    return {**c, "attn_bias": bias, "qk_norm": True,
            "d_ff": hf["intermediate_size"], "expert_d_ff": hf["moe_intermediate_size"],
            "ffn_layout": _qwen_layout(hf, "qwen3_moe"),
            "router": _router(hf, normalize_topk=bool(hf.get("norm_topk_prob", False)))}


def _olmoe(hf: dict) -> dict[str, Any]:
    c = _common(hf, "olmoe")
    if hf.get("clip_qkv") is not None:
        _refuse("olmoe", "clip_qkv", hf["clip_qkv"], "q/k/v clipping is not implemented")
    width = hf["intermediate_size"]
    experts = _num_experts(hf, "num_experts", "num_local_experts")
    return {**c, "attn_bias": bool(hf.get("attention_bias", False)), "qk_norm": True,
            "qk_norm_scope": "full", "head_dim": c["d_model"] // c["n_heads"], "d_ff": width,
            "expert_d_ff": width,
            "ffn_layout": _layout(hf, "olmoe", lambda i: True, experts, "num_hidden_layers"),
            "router": _router(hf, normalize_topk=bool(hf.get("norm_topk_prob", False)))}


_FIRST_K_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}  # transformers' config classes


def _deepseek_layout(hf: dict, model_type: str) -> tuple[str, ...]:
    first = hf.get("first_k_dense_replace", _FIRST_K_DENSE_DEFAULT[model_type])
    freq = hf.get("moe_layer_freq")
    freq = 1 if freq is None else freq
    for name, value, low in (("first_k_dense_replace", first, 0), ("moe_layer_freq", freq, 1)):
        if not isinstance(value, int) or value < low:
            _refuse(model_type, name, value, f"must be an integer >= {low}")
    experts = _num_experts(hf, "n_routed_experts", "num_local_experts")
    return _layout(hf, model_type, lambda i: i >= first and i % freq == 0, experts,
                   f"first_k_dense_replace={first}, moe_layer_freq={freq}")


def _deepseek(hf: dict, model_type: str) -> dict[str, Any]:
    c = _common(hf, model_type)
    if hf.get("attention_bias"):
        _refuse(model_type, "attention_bias", True, "MLA projections are bias-free here")
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    n_shared = hf.get("n_shared_experts") or 0
    groups, topk_groups = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if model_type == "deepseek_v2":
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            _refuse(model_type, "topk_method", method, "greedy or group_limited_greedy")
        if hf.get("norm_topk_prob"):
            _refuse(model_type, "norm_topk_prob", True, "HF's DeepSeek-V2 never renormalises")
        if method == "greedy":
            groups = topk_groups = 1
        router = _router(hf, score_func="softmax", num_groups=groups, topk_groups=topk_groups,
                         group_score="max", routed_scaling=hf.get("routed_scaling_factor", 1.0))
        interleave = True  # V2 rotates adjacent pairs (complex multiplication)
    else:
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            _refuse(model_type, "topk_method", hf["topk_method"], "noaux_tc only")
        router = _router(hf, score_func="sigmoid", num_groups=groups, topk_groups=topk_groups,
                         group_score="top2_sum", expert_bias=True,
                         normalize_topk=bool(hf.get("norm_topk_prob", True)),
                         routed_scaling=hf.get("routed_scaling_factor", 1.0))
        interleave = bool(hf.get("rope_interleave", True))
    return {**c, "n_kv_heads": c["n_heads"], "head_dim": mla.qk_head_dim, "mla": mla,
            "rope_interleave": interleave, "ffn_layout": _deepseek_layout(hf, model_type),
            "d_ff": hf["intermediate_size"], "expert_d_ff": hf["moe_intermediate_size"],
            "num_shared_experts": n_shared,
            "shared_d_ff": n_shared * hf["moe_intermediate_size"], "router": router}


def _moeflow_gpt(hf: dict) -> dict[str, Any]:
    m = hf.get("moeflow")
    arch = m.get("arch") if isinstance(m, dict) else None
    if arch != "gpt":
        _refuse(GPT_MODEL_TYPE, "moeflow.arch", arch, "the class runs a GPT-family ModelConfig, "
                "stored under 'moeflow'")
    return m


def _llama(hf: dict) -> dict[str, Any]:
    c = _common(hf, "llama")
    if hf.get("mlp_bias"):
        _refuse("llama", "mlp_bias", True, "the SwiGLU MLP is bias-free here")
    return {**c, "attn_bias": bool(hf.get("attention_bias", False)), "d_ff": hf["intermediate_size"]}


def _qwen2(hf: dict) -> dict[str, Any]:
    c = _common(hf, "qwen2")
    types = set(hf.get("layer_types") or ["full_attention"])
    if types != {"full_attention"}:
        _refuse("qwen2", "layer_types", sorted(types), "full attention only")
    return {**c, "attn_bias": True, "attn_out_bias": False, "head_dim": c["d_model"] // c["n_heads"],
            "d_ff": hf["intermediate_size"]}


_READERS = {"llama": _llama, "qwen2": _qwen2, "mixtral": _mixtral,
            "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
            "olmoe": _olmoe, "deepseek_v2": lambda hf: _deepseek(hf, "deepseek_v2"),
            "deepseek_v3": lambda hf: _deepseek(hf, "deepseek_v3"),
            GPT_MODEL_TYPE: _moeflow_gpt}


def hf_model_type(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type not in _READERS:
        raise ValueError(f"unsupported architecture model_type={model_type!r} "
                         f"(architectures={hf.get('architectures')}); supported: "
                         f"{', '.join(HF_MODEL_TYPES + HF_DENSE_MODEL_TYPES)}")
    return model_type


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a HF config.json dict; ValueError naming what is unsupported."""
    fields = _READERS[hf_model_type(hf)](hf)
    if hf["model_type"] == GPT_MODEL_TYPE:
        return ModelConfig.from_dict(fields)
    pregate = hf.get(PREGATE_KEY)
    if pregate is None:
        return ModelConfig(**fields)
    if (not isinstance(pregate, dict) or not isinstance(pregate.get("rank"), int)
            or not isinstance(pregate.get("depth", 1), int)):
        raise ValueError(f"config.json {PREGATE_KEY}={pregate!r}: expected "
                         f"{{\"rank\": int, \"depth\": int (optional, default 1)}}")
    return ModelConfig(**fields, pregate=True, pregate_rank=pregate["rank"],
                       pregate_depth=pregate.get("depth", 1))


# ---- export --------------------------------------------------------------------------------

def _choose_model_type(c: ModelConfig) -> str:
    if c.arch == "gpt":
        return GPT_MODEL_TYPE
    if not c.is_moe:
        raise ValueError("a dense model (no MoE layers) has no HF MoE counterpart")
    if c.moe_kind != "moe":
        raise ValueError(f"moe_kind={c.moe_kind!r}: Residual-MoE layers have no HF counterpart "
                         f"of the Llama family (only GPT-family models export them, as "
                         f"{GPT_MODEL_TYPE})")
    if len(set(c.num_experts)) > 1:
        raise ValueError(f"num_experts={c.num_experts!r}: HF MoE configs have one expert count "
                         f"for every MoE layer")
    if c.mla is not None:
        return "deepseek_v3" if c.router.score_func == "sigmoid" else "deepseek_v2"
    if c.shared_expert_gate:
        return "qwen2_moe"
    if c.qk_norm:
        return "olmoe" if c.qk_norm_scope == "full" else "qwen3_moe"
    return "mixtral"


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A HF config.json dict describing the same network as `c` (ValueError if none does)."""
    if c.lookahead:  # it decides every layer's routing: no HF class computes that
        raise ValueError("lookahead: the model routes by a lookahead router, which no "
                         "transformers architecture (nor moeflow_gpt's remote code) computes; "
                         "convert it --to moeflow instead")
    t = _choose_model_type(c)
    if t == GPT_MODEL_TYPE:
        return _gpt_to_hf(c)
    r = c.router
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[t]], "model_type": t, "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
        "num_experts_per_tok": r.top_k, "router_aux_loss_coef": r.aux_loss_coef,
        "intermediate_size": c.d_ff, "moe_intermediate_size": c.expert_d_ff,
        "norm_topk_prob": r.normalizes, "attention_bias": c.attn_bias,
    }
    E = c.num_experts[0]
    if t == "mixtral":
        hf.update(num_local_experts=E, head_dim=c.head_dim, intermediate_size=c.expert_d_ff)
    elif t in ("qwen2_moe", "qwen3_moe"):
        step, mlp_only = _qwen_sparsity(c)
        hf.update(num_experts=E, decoder_sparse_step=step, mlp_only_layers=mlp_only)
        if t == "qwen2_moe":
            hf.update(qkv_bias=c.attn_bias, shared_expert_intermediate_size=c.shared_d_ff)
        else:
            hf.update(head_dim=c.head_dim)
    elif t == "olmoe":
        hf.update(num_experts=E, intermediate_size=c.expert_d_ff, clip_qkv=None)
    else:
        m = c.mla
        n_shared = c.shared_d_ff // c.expert_d_ff if c.num_shared_experts else 0
        hf.update(n_routed_experts=E, n_shared_experts=n_shared,
                  first_k_dense_replace=_deepseek_first_k_dense(c, t), moe_layer_freq=1,
                  q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
                  qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                  v_head_dim=m.v_head_dim, head_dim=m.qk_rope_head_dim,
                  n_group=r.num_groups, topk_group=r.topk_groups,
                  routed_scaling_factor=r.routed_scaling)
        if t == "deepseek_v2":
            hf.update(topk_method="group_limited_greedy" if r.num_groups > 1 else "greedy")
        else:
            hf.update(topk_method="noaux_tc", rope_interleave=c.rope_interleave,
                      num_nextn_predict_layers=0)
    if c.pregate:
        hf[PREGATE_KEY] = {"rank": c.pregate_rank}
        if c.pregate_depth != 1:  # depth-1 exports stay as they were before depth existed
            hf[PREGATE_KEY]["depth"] = c.pregate_depth
    _check_round_trip(c, config_from_hf(hf), t)
    return hf


def _gpt_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The remote-code config: the ModelConfig itself, plus the usual HF names derived from it
    (for tools that read config.json without running code)."""
    return {"architectures": [HF_ARCHITECTURES[GPT_MODEL_TYPE]], "model_type": GPT_MODEL_TYPE,
            "auto_map": dict(GPT_AUTO_MAP), "moeflow": c.to_dict(),
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings}


def _qwen_sparsity(c: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) making exactly c's MoE layers sparse, with the
    fewest mlp_only_layers (ties: the smaller step)."""
    moe = set(c.moe_layer_indices())
    best: tuple[int, list[int]] | None = None
    for step in range(1, c.n_layers + 1):
        if any((i + 1) % step for i in moe):
            continue
        mlp_only = [i for i in range(c.n_layers) if (i + 1) % step == 0 and i not in moe]
        if best is None or len(mlp_only) < len(best[1]):
            best = (step, mlp_only)
    return best


def _deepseek_first_k_dense(c: ModelConfig, model_type: str) -> int:
    moe = c.moe_layer_indices()
    dense = [i for i in range(moe[0], c.n_layers) if i not in moe]
    if dense:
        raise ValueError(f"ffn_layout[{dense[0]}]='dense' follows MoE layer {moe[0]}: HF "
                         f"{model_type} makes every layer from first_k_dense_replace on MoE "
                         f"(transformers ignores moe_layer_freq)")
    return moe[0]


_ROUTER_FIELDS = ("top_k", "score_func", "normalizes", "routed_scaling", "num_groups",
                  "topk_groups")
_MODEL_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len", "norm_eps",
                 "rope_theta", "qk_norm", "rope_interleave", "attn_bias", "attn_out_bias",
                 "mlp_bias", "tie_embeddings", "mla", "pregate",
                 "pregate_rank", "pregate_depth")


def _check_round_trip(c: ModelConfig, back: ModelConfig, model_type: str) -> None:
    def differ(field: str, mine: Any, theirs: Any) -> None:
        raise ValueError(f"{field}={mine!r} cannot be expressed as HF {model_type} "
                         f"(it would read back as {theirs!r})")

    fields = list(_MODEL_FIELDS)
    if c.mla is None:
        fields += ["n_kv_heads", "head_dim"]
    if c.qk_norm:
        fields.append("qk_norm_scope")
    for f in fields:
        if getattr(c, f) != getattr(back, f):
            differ(f, getattr(c, f), getattr(back, f))
    for f in _ROUTER_FIELDS:
        if getattr(c.router, f) != getattr(back.router, f):
            differ(f"router.{f}", getattr(c.router, f), getattr(back.router, f))
    if c.router.num_groups > 1 and c.router.group_score != back.router.group_score:
        differ("router.group_score", c.router.group_score, back.router.group_score)
    if c.router.expert_bias and not back.router.expert_bias:
        differ("router.expert_bias", True, False)
    for i, (a, b) in enumerate(zip(c.ffn_specs(), back.ffn_specs())):
        for f in ("kind", "num_experts", "expert_d_ff", "shared_d_ff", "shared_expert_gate"):
            if getattr(a, f) != getattr(b, f):
                differ(f"layer {i} {f}", getattr(a, f), getattr(b, f))
        if a.kind == "dense" and a.d_ff != b.d_ff:
            differ(f"layer {i} d_ff", a.d_ff, b.d_ff)


def is_moeflow_config(data: dict) -> bool:
    """A moeflow config.json (ModelConfig.to_dict) rather than a HF one."""
    return "model_type" not in data and "arch" in data and "d_model" in data


__all__ = ["GPT_MODEL_TYPE", "GPT_REMOTE_CODE", "PREGATE_KEY", "HF_DENSE_MODEL_TYPES", "HF_MODEL_TYPES",
           "config_from_hf", "config_to_hf", "hf_model_type", "is_moeflow_config"]
