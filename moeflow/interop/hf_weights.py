"""Tensor names and layouts: HF checkpoints ⇄ moeflow state dicts, and safetensors directories.

One table of `Rule`s per (config, model_type) describes both directions: a moeflow tensor is
built from one or more HF tensors (`join`) and split back into them (`split`). The differences
are layout only: HF keeps q/k/v and gate/up as separate Linear weights [out, in], moeflow fuses
them (attn.qkv, fc_in = [gate | up]); HF stores experts one module each (`experts.{e}.gate_proj`,
Mixtral `w1/w3/w2`) where moeflow stacks them transposed for grouped matmuls (w_in_EDI [E, D, 2F],
w_out_EFD [E, F, D]). transformers ≥ 5 fuses experts in memory (`experts.gate_up_proj`
[E, 2F, D], `experts.down_proj` [E, D, F]); checkpoints in that form are read too.

Loading checks names both ways before any tensor is converted: a tensor the config needs and the
checkpoint lacks, or a checkpoint tensor nothing uses, is a ValueError naming it, so a model is
never half-loaded. Ignored on purpose: RoPE inv_freq buffers, a tied lm_head, DeepSeek's
multi-token-prediction layers (index >= num_hidden_layers).

moeflow_gpt (moeflow's own remote-code class, see hf_config) keeps every moeflow tensor as it is,
under `model.` (the head stays `lm_head.weight`): its rules are renames.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.checkpoint.errors import CheckpointError, reading
from moeflow.config import ModelConfig
from moeflow.interop.hf_config import GPT_MODEL_TYPE

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    moeflow: str
    hf: tuple[str, ...]
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    alt: "Rule | None" = None  # another HF layout of the same tensor (fused experts)
    same: bool = False  # one HF tensor, stored as it is (a rank may read just its rows)


def _same(mf: str, hf: str) -> Rule:
    return Rule(mf, (hf,), lambda ts: ts[0], lambda t: [t], same=True)


def _cat(mf: str, hf: Iterable[str], sizes: list[int]) -> Rule:
    return Rule(mf, tuple(hf), lambda ts: torch.cat(ts, 0), lambda t: list(t.split(sizes, 0)))


def _expert_rules(mf: str, hf: str, E: int, F: int, names: tuple[str, str, str]) -> list[Rule]:
    gate, up, down = names

    def join_in(ts: list[torch.Tensor]) -> torch.Tensor:  # [g0, u0, g1, u1, ...] each [F, D]
        return torch.stack([torch.cat(ts[2 * e:2 * e + 2], 0).t() for e in range(E)])

    def split_in(w_EDI: torch.Tensor) -> list[torch.Tensor]:
        return [part.contiguous() for e in range(E) for part in w_EDI[e].t().split(F, 0)]

    fused_in = Rule(mf + ".w_in_EDI", (f"{hf}experts.gate_up_proj",),
                    lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2).contiguous()])
    fused_out = Rule(mf + ".w_out_EFD", (f"{hf}experts.down_proj",),
                     lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2).contiguous()])
    w_in = Rule(mf + ".w_in_EDI",
                tuple(f"{hf}experts.{e}.{n}.weight" for e in range(E) for n in (gate, up)),
                join_in, split_in, alt=fused_in)
    w_out = Rule(mf + ".w_out_EFD", tuple(f"{hf}experts.{e}.{down}.weight" for e in range(E)),
                 lambda ts: torch.stack([t.t() for t in ts]),
                 lambda w: [w[e].t().contiguous() for e in range(E)], alt=fused_out)
    return [w_in, w_out]


def _mlp_rules(mf: str, hf: str, width: int) -> list[Rule]:
    return [_cat(f"{mf}fc_in.weight", (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"),
                 [width, width]),
            _same(f"{mf}fc_out.weight", f"{hf}down_proj.weight")]


def _attention_rules(c: ModelConfig, mf: str, hf: str) -> list[Rule]:
    if c.mla is not None:
        rules = [_same(f"{mf}kv_a_proj.weight", f"{hf}kv_a_proj_with_mqa.weight"),
                 _same(f"{mf}kv_a_norm.weight", f"{hf}kv_a_layernorm.weight"),
                 _same(f"{mf}kv_b_proj.weight", f"{hf}kv_b_proj.weight"),
                 _same(f"{mf}proj.weight", f"{hf}o_proj.weight")]
        if c.mla.q_lora_rank:
            rules += [_same(f"{mf}q_a_proj.weight", f"{hf}q_a_proj.weight"),
                      _same(f"{mf}q_a_norm.weight", f"{hf}q_a_layernorm.weight"),
                      _same(f"{mf}q_b_proj.weight", f"{hf}q_b_proj.weight")]
        else:
            rules.append(_same(f"{mf}q_proj.weight", f"{hf}q_proj.weight"))
        return rules
    sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    qkv = [f"{hf}{p}_proj" for p in "qkv"]
    rules = [_cat(f"{mf}qkv.weight", (n + ".weight" for n in qkv), sizes),
             _same(f"{mf}proj.weight", f"{hf}o_proj.weight")]
    if c.attn_bias:
        rules.append(_cat(f"{mf}qkv.bias", (n + ".bias" for n in qkv), sizes))
    if c.attn_out_bias:
        rules.append(_same(f"{mf}proj.bias", f"{hf}o_proj.bias"))
    if c.qk_norm:
        rules += [_same(f"{mf}q_norm.weight", f"{hf}q_norm.weight"),
                  _same(f"{mf}k_norm.weight", f"{hf}k_norm.weight")]
    return rules


def _gpt_rules(c: ModelConfig) -> list[Rule]:
    from moeflow.model import Transformer

    with torch.device("meta"):
        names = list(Transformer(c).state_dict())
    return [_same(n, n if n == "lm_head.weight" else "model." + n) for n in names
            if not (c.tie_embeddings and n == "lm_head.weight")]


def _pregate_rules(c: ModelConfig) -> list[Rule]:
    """Pre-gate heads in an HF-family export: stored under their moeflow names (hf_config)."""
    from moeflow.model.pregate import PregateHeads

    with torch.device("meta"):
        names = list(PregateHeads.of(c).state_dict())
    return [_same(f"pregate.{n}", f"pregate.{n}") for n in names]


def weight_rules(c: ModelConfig, model_type: str) -> list[Rule]:
    """Every tensor of a `model_type` checkpoint of config `c`, with its moeflow counterpart."""
    if model_type == GPT_MODEL_TYPE:
        return _gpt_rules(c)
    rules = _pregate_rules(c) if c.pregate else []
    return rules + _hf_family_rules(c, model_type)


def _hf_family_rules(c: ModelConfig, model_type: str) -> list[Rule]:
    if c.mlp_bias:
        raise ValueError("mlp_bias=True: HF MoE models have bias-free MLPs")
    rules = [_same("tok_emb.weight", "model.embed_tokens.weight"),
             _same("final_norm.weight", "model.norm.weight")]
    if not c.tie_embeddings:
        rules.append(_same("lm_head.weight", "lm_head.weight"))
    mixtral = model_type == "mixtral"
    for i, spec in enumerate(c.ffn_specs()):
        mf, hf = f"blocks.{i}.", f"model.layers.{i}."
        rules += [_same(mf + "attn_norm.weight", hf + "input_layernorm.weight"),
                  _same(mf + "ffn_norm.weight", hf + "post_attention_layernorm.weight")]
        rules += _attention_rules(c, mf + "attn.", hf + "self_attn.")
        if not spec.is_moe:
            rules += _mlp_rules(mf + "ffn.", hf + "mlp.", spec.d_ff)
            continue
        hf_moe = hf + ("block_sparse_moe." if mixtral else "mlp.")
        rules.append(_same(mf + "ffn.router.gate.weight", hf_moe + "gate.weight"))
        if spec.router.expert_bias:
            rules.append(_same(mf + "ffn.router.expert_bias", hf_moe + "gate.e_score_correction_bias"))
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        rules += _expert_rules(mf + "ffn.experts", hf_moe, spec.num_experts, spec.expert_d_ff, names)
        if spec.shared_d_ff:
            shared = "shared_expert." if model_type == "qwen2_moe" else "shared_experts."
            rules += _mlp_rules(mf + "ffn.shared.", hf_moe + shared, spec.shared_d_ff)
        if spec.shared_expert_gate:
            rules.append(_same(mf + "ffn.shared_gate.weight", hf_moe + "shared_expert_gate.weight"))
    return rules


def _ignorable(name: str, c: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq") or (c.tie_embeddings and name == "lm_head.weight"):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= c.n_layers  # DeepSeek MTP layers


def hf_to_moeflow(c: ModelConfig, model_type: str, available: Iterable[str],
                  get: Callable[[str], torch.Tensor], where: str = "checkpoint"
                  ) -> dict[str, torch.Tensor]:
    """Build the moeflow state dict; `get(name)` reads one HF tensor. Names are checked first."""
    chosen = choose_rules(c, model_type, available, where)
    return {rule.moeflow: rule.join([get(n) for n in rule.hf]) for rule in chosen}


def choose_rules(c: ModelConfig, model_type: str, available: Iterable[str],
                 where: str = "checkpoint") -> list[Rule]:
    """The rule (primary or alternative HF layout) each moeflow tensor is read by, after
    checking the names both ways (ValueError naming the first missing or unused tensor)."""
    available = set(available)
    chosen, used = [], set()
    for rule in weight_rules(c, model_type):
        pick = rule
        if not all(n in available for n in rule.hf):
            if rule.alt is not None and all(n in available for n in rule.alt.hf):
                pick = rule.alt
            else:
                missing = next(n for n in rule.hf if n not in available)
                raise ValueError(f"missing tensor {missing!r} in {where} (needed for "
                                 f"{rule.moeflow!r} of this {model_type} config)")
        chosen.append(pick)
        used.update(pick.hf)
    unexpected = sorted(n for n in available - used if not _ignorable(n, c))
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} in {where} "
                         f"({len(unexpected)} unused; not part of this {model_type} config)")
    return chosen


def moeflow_to_hf(c: ModelConfig, model_type: str, state: Tensors) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rule in weight_rules(c, model_type):
        if rule.moeflow not in state:
            raise ValueError(f"missing tensor {rule.moeflow!r} in the moeflow state dict")
        for name, t in zip(rule.hf, rule.split(state[rule.moeflow]), strict=True):
            out[name] = t.contiguous()
    return out


# ---- safetensors directories -----------------------------------------------------------------

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsDir:
    """Lazy read access to a directory's (possibly sharded) safetensors weights. A file that
    cannot be read or parsed (an index that is not JSON, a shard missing, truncated or with a
    damaged header) is a CheckpointError naming it, raised here for every shard before any
    tensor is read. HF checkpoints carry no checksums: bytes garbled inside the data of a
    well-formed file cannot be told from weights."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            with reading(index):
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and v
                        and not Path(v).is_absolute() and ".." not in Path(v).parts
                        for k, v in weight_map.items()):
                    raise ValueError("'weight_map' is not an object of tensor: file names "
                                     "in this directory")
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise ValueError(f"{index}: shard {shard!r} is missing")
            for shard in sorted(set(weight_map.values())):
                with reading(self.path / shard), safe_open(self.path / shard, "pt") as f:
                    absent = sorted(k for k, v in weight_map.items()
                                    if v == shard and k not in set(f.keys()))
                if absent:
                    raise CheckpointError(f"checkpoint file {self.path / shard} has no tensor "
                                          f"{absent[0]!r}, which {index} places there")
        elif (self.path / SINGLE_NAME).is_file():
            with reading(self.path / SINGLE_NAME), safe_open(self.path / SINGLE_NAME, "pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise ValueError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def get_slice(self, name: str):
        """Lazy view of tensor `name`: indexing it (`[a:b]`, `[:, a:b]`) reads only that part."""
        return self._file(name).get_slice(name)

    def _file(self, name: str):
        shard = self.weight_map[name]
        if shard not in self._open:
            with reading(self.path / shard):
                self._open[shard] = safe_open(self.path / shard, "pt")
        return self._open[shard]


def save_safetensors_dir(tensors: Tensors, path: str | Path, max_shard_bytes: int = 5 << 30,
                         metadata: dict[str, str] | None = None) -> None:
    """Write one model.safetensors, or shards plus model.safetensors.index.json past the limit."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_NAME, metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
