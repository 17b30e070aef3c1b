"""Logit parity with HF transformers for every supported MoE architecture, both directions.

Each case builds a tiny random HF model, saves it with save_pretrained, loads it with
moeflow.from_pretrained and compares logits; then exports the moeflow model back to HF format
and checks transformers reads it to the same logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeflow  # noqa: E402
from moeflow.interop import save_hf  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)

CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=6,
                     num_experts_per_tok=2, head_dim=16)),
    "qwen2_moe-shared-nonorm": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                                dict(num_key_value_heads=2, intermediate_size=40,
                                     moe_intermediate_size=24, shared_expert_intermediate_size=56,
                                     num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
                                     decoder_sparse_step=2, qkv_bias=True)),
    "qwen3_moe-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(num_key_value_heads=2, head_dim=16, intermediate_size=40,
                            moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=True, tie_word_embeddings=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_key_value_heads=4, intermediate_size=24, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v2-groups": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                           dict(num_key_value_heads=4, intermediate_size=40,
                                moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                                num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=12,
                                q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                v_head_dim=8, head_dim=4, topk_method="group_limited_greedy",
                                n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                         first_k_dense_replace=1, kv_lora_rank=12, q_lora_rank=20,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
}


def _hf_model(case: str):
    cfg_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(list(CASES).index(case))  # str hash() changes with every process
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initialises some weights (routers, biases) to 0: randomise all
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_hf_logit_parity_and_export(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    want = _hf_logits(hf, ids)

    ours = moeflow.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = ours(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # export → transformers reads it → same logits
    model_type = save_hf(ours, tmp_path / "out")
    assert model_type == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              attn_implementation="eager").eval()
    torch.testing.assert_close(_hf_logits(back, ids), want, rtol=1e-4, atol=1e-4)


def test_moeflow_checkpoint_round_trip_sharded(tmp_path):
    from moeflow.interop import convert, save_pretrained

    hf = _hf_model("qwen2_moe-shared-nonorm")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several shards + index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = moeflow.from_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "mf", max_shard_bytes=50_000)
    assert (tmp_path / "mf" / "model.safetensors.index.json").is_file()
    again = moeflow.from_pretrained(tmp_path / "mf")
    ids = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
    convert(tmp_path / "mf", tmp_path / "hf2", to="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)
