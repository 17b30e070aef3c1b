"""Dense → MoE: turn a trained dense checkpoint into an MoE that starts where the dense model is.

    moeflow upcycle --from runs/dense --experts 8 --top-k 1 --out runs/dense-8x1
    moeflow upcycle --from runs/dense --experts 8 --top-k 2 --method partition --out runs/rm-8x2
    moeflow upcycle --from ./Qwen2-0.5B --experts 4 --out ./qwen2-4x1      # HF llama/qwen2 dense
    moeflow train --init runs/dense-8x1 --data DATA --steps 1000 --out runs/dense-8x1-train

The source is a moeflow training run (its latest checkpoint), a checkpoint directory, a
moeflow-layout directory, or an HF Llama/Qwen2 dense directory. Every FFN layer chosen by
`moe_every` (all of them by default) becomes an MoE layer of E experts; attention, norms and
embeddings are copied unchanged. The output is a moeflow checkpoint directory (written by
save_pretrained, plus the source's tokenizer files and upcycle.json with what was done and measured)
that `moeflow generate --checkpoint`, `moeflow serve --model` and `moeflow train --init` read.

Methods:
- copy (sparse upcycling, Komatsuzaki et al. 2023): every expert is the dense MLP. Total
  parameters grow by (E−1) MLPs (+ the router) per layer; each token runs k of them, so at
  top-1 the active parameters equal the dense model's plus the router's D·E per layer.
- partition (Read-ME / MoEfication): the FFN's F hidden neurons are split into E groups of F/E
  by co-activation on calibration data, and group e becomes expert e (moeflow.interop.
  neuron_groups). Every dense FFN weight lands in exactly one expert, so the total parameters
  equal the dense model's plus the router's D·E per layer (plus (E−1)·D for a biased GPT MLP,
  whose output bias every expert holds a share of, see `_partition_experts`); a token runs k
  groups: k/E of the dense FFN's weights and FLOPs.

Router and combine weights. Routing is softmax with raw (not renormalised) probabilities times
`routed_scaling`, chosen so that at uniform routing (p = 1/E) the layer is the dense MLP:
copy: E/k (each of the k identical experts weighs 1/k, the weights sum to 1; at top-1 the weight
is exactly 1, so with a zero router the upcycled model's logits are the dense model's);
partition: E (each chosen group weighs 1, so at k = E the groups sum to the dense output).
Raw probabilities rather than renormalised ones so that top-1 routers still get a gradient from
the language-model loss (a renormalised top-1 weight is constantly 1). The router starts at
zero (uniform; copy's default: the copies are identical, there is nothing to rank), from
N(0, init_std) ("normal"), or fitted to the partition's activation statistics ("fit",
partition's default; see neuron_groups). Training capacity, drop policy and the balance loss are
the source config's router settings; evaluation routes dropless (eval_capacity_factor=None), so
a continued run's step-0 validation measures the upcycled function itself (for copy: the dense
model's). With a zero router every token ties and goes to expert 0 until the first optimizer
step moves the router; under a training capacity limit that first step drops most of the MoE
layers' tokens.

Calibration data (partition only): `calib_tokens` tokens of the training split of `calib_data`
(text sources as for `moeflow train`, or a prepared dataset directory), tokenized with the
source's tokenizer, in windows of up to 512 tokens; the FFN inputs of every layer are recorded
from one forward pass of the dense model, so this holds calib_tokens × d_model floats per layer.
The last fifth of the windows is held out to measure the result (upcycle.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.interop import neuron_groups as ng
from moeflow.model import Transformer
from moeflow.model.transformer import count_parameters
from moeflow.validate import check, choice, integer, number, option

METHODS = ("copy", "partition")
ROUTER_INITS = ("zero", "normal", "fit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
MAX_CALIB_WINDOW = 512
REPORT = "upcycle.json"


@dataclass(frozen=True)
class UpcycleConfig:
    source: str = option("the dense model: a moeflow run or checkpoint directory, or an HF "
                         "Llama/Qwen2 directory", flag="--from")
    experts: int = option("experts per MoE layer (E)")
    out: str = option("directory to write the MoE checkpoint to (must not exist)")
    top_k: int = option("experts per token (k)", default=1)
    method: str = option("copy: every expert is the dense MLP; partition: the MLP's neurons split "
                         "into E groups by co-activation (Read-ME)", choices=METHODS,
                         default="copy")
    moe_every: int = option("make every N-th FFN layer an MoE layer, starting at layer N-1 (1: all)",
                            default=1)
    router_init: str | None = option("zero (uniform routing), normal (N(0, init_std)) or fit "
                                     "(partition statistics); default: zero for copy, fit for "
                                     "partition", choices=ROUTER_INITS, default=None)
    calib_data: tuple[str, ...] = option("partition: calibration text (as for train --data) or a "
                                         "prepared dataset directory",
                                         default=("builtin:interpreter",))
    calib_tokens: int = option("partition: calibration tokens", default=16384)
    logit_std: float = option("partition with router fit: per-token spread of the initial "
                              "router logits", default=0.1)
    seed: int = option("seeds the clustering, the normal router init and the data sample",
                       default=0)

    def __post_init__(self) -> None:
        if isinstance(self.calib_data, (list, str)):
            object.__setattr__(self, "calib_data", tuple([self.calib_data] if isinstance(
                self.calib_data, str) else self.calib_data))
        integer("experts", self.experts, lo=1)
        integer("top_k", self.top_k, lo=1, hi=self.experts)
        choice("method", self.method, METHODS)
        integer("moe_every", self.moe_every, lo=1)
        if self.router_init is None:
            object.__setattr__(self, "router_init", "zero" if self.method == "copy" else "fit")
        choice("router_init", self.router_init, ROUTER_INITS)
        check(not (self.method == "copy" and self.router_init == "fit"), "router_init",
              self.router_init, "fit needs --method partition (copies have nothing to rank)")
        integer("calib_tokens", self.calib_tokens, lo=64)
        number("logit_std", self.logit_std, lo=0, lo_open=True)
        integer("seed", self.seed, lo=0)
        check(bool(self.calib_data), "calib_data", self.calib_data, "must name a source")


@dataclass(frozen=True)
class UpcycleResult:
    out: Path
    config: ModelConfig
    params_dense: tuple[int, int]  # (total, active)
    params_moe: tuple[int, int]
    report: dict

    def summary(self) -> list[str]:
        (td, ad), (tm, am) = self.params_dense, self.params_moe
        lines = [f"{self.report['method']}: {len(self.config.moe_layer_indices())} MoE layers × "
                 f"{self.config.num_experts[0]} experts, top-{self.config.router.top_k}",
                 f"parameters: dense {td:,} total / {ad:,} active -> MoE {tm:,} total / "
                 f"{am:,} active"]
        quality = self.report.get("layers")
        if quality:
            mean = {k: sum(q[k] for q in quality.values()) / len(quality)
                    for k in next(iter(quality.values()))}
            lines.append(f"held-out, mean over layers: router picks the largest group "
                         f"{mean['router_top1_is_largest']:.1%}; output error router "
                         f"{mean['rel_error_router']:.3f} / oracle {mean['rel_error_oracle']:.3f}"
                         f" / random {mean['rel_error_random']:.3f}")
        lines.append(f"wrote {self.out}")
        return lines


# ---- the source ------------------------------------------------------------------------------

def moe_config(dense: ModelConfig, cfg: UpcycleConfig) -> ModelConfig:
    """The MoE's ModelConfig: the dense one with MoE layers and the upcycling router."""
    if dense.is_moe:
        raise ValueError(f"upcycle: {cfg.source!r} is already an MoE (layers "
                         f"{list(dense.moe_layer_indices())} have experts); --from takes a dense "
                         f"model")
    E, k = cfg.experts, cfg.top_k
    if cfg.method == "partition" and dense.d_ff % E:
        raise ValueError(f"upcycle: --experts {E} does not divide the FFN width d_ff={dense.d_ff} "
                         f"(partition gives every expert d_ff/E neurons)")
    layers = range(cfg.moe_every - 1, dense.n_layers, cfg.moe_every)
    if not layers:
        raise ValueError(f"upcycle: --moe-every {cfg.moe_every} leaves no MoE layer in "
                         f"{dense.n_layers} layers")
    layout = tuple(f"moe:{E}" if i in layers else "dense" for i in range(dense.n_layers))
    router = dataclasses.replace(
        dense.router, top_k=k, score_func="softmax", normalize_topk=False, eval_capacity_factor=None,
        routed_scaling=E / k if cfg.method == "copy" else float(E), num_groups=1, topk_groups=1,
        expert_bias=False)
    width = dense.d_ff if cfg.method == "copy" else dense.d_ff // E
    return dense.replace(name=f"{dense.name}-{cfg.method}-{E}x{k}", ffn_layout=layout,
                         router=router, expert_d_ff=width, num_shared_experts=0,
                         shared_d_ff=0, shared_expert_gate=False)


# ---- calibration ------------------------------------------------------------------------------

def calibration_tokens(cfg: UpcycleConfig, tokenizer: BPETokenizer | None, max_seq_len: int
                       ) -> torch.Tensor:
    """ids_NW: windows of the training split of cfg.calib_data, cfg.calib_tokens in all."""
    from moeflow.data.corpus import interpreter_documents, load_corpus, split_documents
    from moeflow.data.prepared import is_prepared, load_prepared

    window = min(max_seq_len, MAX_CALIB_WINDOW)
    n = max(2, math.ceil(cfg.calib_tokens / window))
    if len(cfg.calib_data) == 1 and is_prepared(cfg.calib_data[0]):
        data = load_prepared(cfg.calib_data[0])
        if tokenizer is not None and data.tokenizer.to_str() != tokenizer.to_str():
            raise ValueError(f"upcycle: the prepared dataset {cfg.calib_data[0]!r} has another "
                             f"tokenizer than the model")
        stream = np.asarray(data.train_tokens, dtype=np.int64)
    else:
        if tokenizer is None:
            raise ValueError(f"upcycle: --method partition needs the model's tokenizer.json in "
                             f"{cfg.source!r} to tokenize the calibration data")
        if cfg.calib_data == ("builtin:interpreter",):  # a sample is plenty for calibration
            docs = interpreter_documents(max_bytes=max(32 * cfg.calib_tokens, 1 << 20))[0]
        else:
            docs = load_corpus(cfg.calib_data)
        train, _ = split_documents(docs, 0.05)
        ids: list[int] = []
        for doc in train:
            ids += tokenizer.encode(doc.text)
            if len(ids) >= 4 * n * window:
                break
        stream = np.asarray(ids, dtype=np.int64)
    starts_available = len(stream) - window
    if starts_available < n:
        raise ValueError(f"upcycle: the calibration data holds {len(stream)} tokens, fewer than "
                         f"the {n} windows of {window} it needs")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randperm(starts_available, generator=gen)[:n].sort().values
    return torch.stack([torch.from_numpy(stream[s:s + window]) for s in starts.tolist()])


@torch.no_grad()
def ffn_inputs(model: Transformer, ids_NW: torch.Tensor, layers: list[int]
               ) -> dict[int, torch.Tensor]:
    """x_TD entering each listed layer's FFN (after its norm), for every calibration token."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.blocks[i].ffn.register_forward_hook(
        lambda _m, args, _out, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i in layers]
    try:
        for batch in ids_NW.split(8):
            model(batch, inference=True)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs) for i, xs in seen.items()}


# ---- building the experts ---------------------------------------------------------------------

def _copy_experts(mlp: dict[str, torch.Tensor], E: int) -> dict[str, torch.Tensor]:
    out = {"experts.w_in_EDI": mlp["fc_in.weight"].t().expand(E, -1, -1).clone(),
           "experts.w_out_EFD": mlp["fc_out.weight"].t().expand(E, -1, -1).clone()}
    if "fc_in.bias" in mlp:
        out["experts.b_in_EI"] = mlp["fc_in.bias"].expand(E, -1).clone()
        out["experts.b_out_ED"] = mlp["fc_out.bias"].expand(E, -1).clone()
    return out


def _partition_experts(mlp: dict[str, torch.Tensor], groups_EG: torch.Tensor, swiglu: bool,
                       top_k: int) -> dict[str, torch.Tensor]:
    """Expert e = neurons groups_EG[e]: their fc_in columns (gate and up for SwiGLU) and fc_out
    rows. Each of a token's k experts adds its output bias with weight ~1 (exactly 1 at uniform
    routing), so each holds b_out/k and the layer adds b_out once, as the dense MLP does."""
    w_in, w_out = mlp["fc_in.weight"], mlp["fc_out.weight"]  # [I, D], [D, F]
    F_ = w_out.shape[1]
    rows_EG = torch.cat([groups_EG, groups_EG + F_], 1) if swiglu else groups_EG
    out = {"experts.w_in_EDI": torch.stack([w_in[r].t() for r in rows_EG]),
           "experts.w_out_EFD": torch.stack([w_out[:, g].t() for g in groups_EG])}
    if "fc_in.bias" in mlp:
        E = len(groups_EG)
        out["experts.b_in_EI"] = torch.stack([mlp["fc_in.bias"][r] for r in rows_EG])
        out["experts.b_out_ED"] = (mlp["fc_out.bias"] / top_k).expand(E, -1).clone()
    return out


def upcycle_model(dense: Transformer, cfg: UpcycleConfig,
                  calib_ids_NW: torch.Tensor | None = None) -> tuple[Transformer, dict]:
    """(the MoE model, per-layer measurements). `calib_ids_NW` is needed for partition."""
    config = moe_config(dense.config, cfg)
    E = cfg.experts
    swiglu = config.arch != "gpt"
    activation = "swiglu" if swiglu else "gelu"
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    layers = list(config.moe_layer_indices())
    inputs = {}
    if cfg.method == "partition":
        if calib_ids_NW is None:
            raise ValueError("upcycle: --method partition needs calibration tokens")
        inputs = ffn_inputs(dense.eval(), calib_ids_NW, layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    quality = {}
    for i in layers:
        prefix = f"blocks.{i}.ffn."
        mlp = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        router_ED = torch.zeros(E, config.d_model, dtype=mlp["fc_out.weight"].dtype)
        if cfg.router_init == "normal":
            router_ED = torch.randn(E, config.d_model, generator=gen) * config.init_std
        if cfg.method == "copy":
            experts = _copy_experts(mlp, E)
        else:
            x_TD = inputs[i].double()
            n_fit = x_TD.shape[0] * 4 // 5 // calib_ids_NW.shape[1] * calib_ids_NW.shape[1]
            w_in, w_out = mlp["fc_in.weight"].double(), mlp["fc_out.weight"].double()
            b_in = mlp["fc_in.bias"].double() if "fc_in.bias" in mlp else None
            act_TF = ng.ffn_activations(w_in, b_in, x_TD, activation)
            groups_EG = ng.balanced_clusters(ng.coactivation_features(act_TF[:n_fit]), E,
                                             seed=cfg.seed)
            if cfg.router_init == "fit":
                shares_TE = ng.group_outputs(act_TF[:n_fit], w_out, groups_EG).norm(dim=2)
                router_ED = ng.fit_router(x_TD[:n_fit], shares_TE, cfg.logit_std)
            quality[str(i)] = ng.group_quality(
                x_TD[n_fit:], act_TF[n_fit:], w_out, groups_EG, router_ED.double(),
                cfg.top_k, cfg.seed).to_dict()
            experts = _partition_experts(mlp, groups_EG, swiglu, cfg.top_k)
            state[prefix + "experts.groups_EG"] = groups_EG  # popped below, kept in the report
        state[prefix + "router.gate.weight"] = router_ED.to(mlp["fc_out.weight"].dtype)
        state.update({prefix + k: v.to(mlp["fc_out.weight"].dtype) for k, v in experts.items()})
    groups = {k: state.pop(k) for k in list(state) if k.endswith("groups_EG")}
    with torch.device("meta"):
        moe = Transformer(config)
    moe.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        moe.lm_head.weight = moe.tok_emb.weight
    report = {"layers": quality} if quality else {}
    if groups:
        report["groups_digest"] = {k.split(".")[1]: _digest(v) for k, v in groups.items()}
    return moe.eval(), report


def _digest(groups_EG: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(groups_EG.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


# ---- the command -----------------------------------------------------------------------------

def upcycle(cfg: UpcycleConfig) -> UpcycleResult:
    """Load cfg.source, build the MoE, write cfg.out; everything is checked before writing."""
    # here, not at the top: the command line imports this module for UpcycleConfig's flags, and
    # the checkpoint readers/writers bring torch.distributed.checkpoint (~0.7 s) with them
    from moeflow.interop.pretrained import load_model_dir, save_pretrained

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"upcycle: --out {cfg.out!r} already exists and is not empty")
    start = time.perf_counter()
    if not Path(cfg.source).exists():
        raise ValueError(f"upcycle: --from {cfg.source!r} does not exist")
    dense, tokenizer, tok_dir = load_model_dir(cfg.source)
    config = moe_config(dense.config, cfg)  # refuses MoE sources and bad E before any work
    calib = None
    if cfg.method == "partition":
        calib = calibration_tokens(cfg, tokenizer, dense.config.max_seq_len)
    moe, report = upcycle_model(dense, cfg, calib)
    params_dense, params_moe = count_parameters(dense), count_parameters(moe)
    save_pretrained(moe, out)
    for name in TOKENIZER_FILES:
        if tok_dir is not None and (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    report = {
        "source": str(cfg.source), "method": cfg.method, "experts": cfg.experts,
        "top_k": cfg.top_k, "moe_layers": list(config.moe_layer_indices()),
        "router_init": cfg.router_init, "routed_scaling": config.router.routed_scaling,
        "params_dense": {"total": params_dense[0], "active": params_dense[1]},
        "params_moe": {"total": params_moe[0], "active": params_moe[1]},
        "calibration": None if calib is None else {
            "data": list(cfg.calib_data), "windows": calib.shape[0], "window": calib.shape[1],
            "held_out_windows": calib.shape[0] - calib.shape[0] * 4 // 5},
        **report, "config": dataclasses.asdict(cfg),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return UpcycleResult(out, config, params_dense, params_moe, report)
