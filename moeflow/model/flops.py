"""Training FLOPs per token of a model: what MFU and the reproduction's loss-vs-FLOPs plot use.

6 · (active parameters, the embedding table excluded) + 12 · layers · heads · head_dim · seq:
PaLM's formula (forward 2 FLOPs per parameter per token, backward 4; attention scores and
values counted over the whole sequence, without the causal halving). An MoE layer's active
parameters are its router, any dense branches and top_k of its E experts. A tied LM head is a
matmul and is counted once, as the head. A forward pass alone is a third of this.
"""

from __future__ import annotations

from moeflow.config import ModelConfig


def training_flops_per_token(config: ModelConfig, seq: int) -> float:
    from moeflow.model.transformer import parameter_counts

    _, active = parameter_counts(config)
    embedding = config.vocab_size * config.d_model
    if config.arch == "gpt":
        embedding += config.max_seq_len * config.d_model
    if config.tie_embeddings:
        embedding -= config.vocab_size * config.d_model
    return 6.0 * (active - embedding) + 12.0 * config.n_layers * config.n_heads * \
        config.head_dim * seq
