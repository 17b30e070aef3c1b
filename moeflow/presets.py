"""Named model configurations: the DeepSpeed-MoE paper's models, a CPU-sized PR-MoE, modern shapes.

Paper models (GPT-3 style, vocab 50257, sequence 2048, MoE on every other layer, top-1):
  dense 350m / 1.3b / 6.7b; "+MoE-128" (128 experts per MoE layer); PR-MoE (Residual-MoE layers,
  fewer experts early, more in the last two MoE layers); Mixture-of-Students (MoS) students with
  21 instead of 24 layers. The paper's totals: 350m-moe128 13B, 1.3b-moe128 52B,
  350m-pr-moe-32-64 4B, 1.3b-pr-moe-64-128 31B, 350m-mos 3.5B, 1.3b-mos 27B.

Plain data: each preset is the keyword arguments of a ModelConfig (its router a dict), so this
module imports nothing from moeflow; `ModelConfig.from_name(name)` builds one and
`moeflow.config.PRESETS` holds them all.
"""

from __future__ import annotations

from typing import Any

_PAPER_ROUTER = dict(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4,
                     aux_loss_coef=0.01)


def _gpt(name: str, n_layers: int, d_model: int, n_heads: int, **moe) -> dict[str, Any]:
    return dict(name=name, arch="gpt", vocab_size=50257, n_layers=n_layers, d_model=d_model,
                n_heads=n_heads, max_seq_len=2048, router=_PAPER_ROUTER, **moe)


def _pyramid(n_layers: int, early: int, late: int) -> dict:
    """PR-MoE: dense even layers, Residual-MoE odd layers with `early` experts, except the last
    two MoE layers, which get `late` (the paper's pyramid: more experts where they help most)."""
    moe_layers = range(1, n_layers, 2)
    layout = ["dense"] * n_layers
    for i in moe_layers:
        layout[i] = f"residual_moe:{late if i >= moe_layers[-2] else early}"
    return dict(ffn_layout=tuple(layout))


PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "350m": _gpt("350m", 24, 1024, 16),
    "1.3b": _gpt("1.3b", 24, 2048, 16),
    "6.7b": _gpt("6.7b", 32, 4096, 32),
    "350m-moe128": _gpt("350m-moe128", 24, 1024, 16, moe_every=2, num_experts=128),
    "1.3b-moe128": _gpt("1.3b-moe128", 24, 2048, 16, moe_every=2, num_experts=128),
    "350m-pr-moe-32-64": _gpt("350m-pr-moe-32-64", 24, 1024, 16, **_pyramid(24, 32, 64)),
    "1.3b-pr-moe-64-128": _gpt("1.3b-pr-moe-64-128", 24, 2048, 16, **_pyramid(24, 64, 128)),
    "350m-mos-pr-moe-32-64": _gpt("350m-mos-pr-moe-32-64", 21, 1024, 16,
                                  **_pyramid(21, 32, 64)),
    "1.3b-mos-pr-moe-64-128": _gpt("1.3b-mos-pr-moe-64-128", 21, 2048, 16,
                                   **_pyramid(21, 64, 128)),
    # A PR-MoE that trains in minutes on 2 CPU cores: 4 layers, Residual-MoE with 4 then 8
    # experts. Its vocabulary matches the trainer's default BPE tokenizer size.
    "tiny": dict(name="tiny", arch="gpt", vocab_size=2048, n_layers=4, d_model=128, n_heads=4,
             max_seq_len=128, moe_kind="residual_moe", moe_every=2, num_experts=(4, 8),
             router=dict(top_k=1, min_capacity=4)),
    # Modern fine-grained MoE (DeepSeek-MoE style), Llama architecture: 64 narrow routed
    # experts, top-6, plus 2 always-on shared experts; first layer dense. ~1B active params.
    "finegrained-1b": dict(
        name="finegrained-1b", arch="llama", vocab_size=32000, n_layers=16, d_model=2048,
        n_heads=16, n_kv_heads=4, d_ff=5632, max_seq_len=4096, rope_theta=10000.0,
        moe_every=1, first_moe_layer=1, num_experts=64, expert_d_ff=704,
        num_shared_experts=2,
        router=dict(top_k=6, dropless=True, normalize_topk=False, aux_loss_coef=0.001),
    ),
    # Qwen3-30B-A3B shape (benchmarks): 48 layers, 128 experts of width 768, top-8.
    "qwen3-30b-a3b": dict(
        name="qwen3-30b-a3b", arch="llama", vocab_size=151936, n_layers=48, d_model=2048,
        n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144, max_seq_len=40960,
        norm_eps=1e-6, rope_theta=1e6, qk_norm=True, moe_every=1, num_experts=128,
        expert_d_ff=768,
        router=dict(top_k=8, dropless=True, normalize_topk=True, aux_loss_coef=0.001),
    ),
}
