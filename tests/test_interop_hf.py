"""Logit parity with HF transformers for every supported MoE architecture, both directions.

Each case builds a tiny random HF model, saves it with save_pretrained, loads it with
moeflow.from_pretrained and compares logits; then exports the moeflow model back to HF format
and checks transformers reads it to the same logits. Cases with dense layers between MoE layers
(Qwen's decoder_sparse_step and mlp_only_layers, DeepSeek's first_k_dense_replace) also check
that moeflow puts experts on exactly the layers where transformers does.

transformers is pinned in the [test] extra, so these tests run wherever the tests do; it needs
Python >= 3.11, the only reason they skip.
"""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

if sys.version_info < (3, 11):
    pytest.skip("transformers 5 needs Python >= 3.11", allow_module_level=True)

import transformers  # noqa: E402

import moeflow  # noqa: E402
from moeflow.interop import config_from_hf, config_to_hf, save_hf  # noqa: E402

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
    "qwen2_moe-mlp_only": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # MoE, dense, MoE
                           dict(num_key_value_heads=2, intermediate_size=40,
                                moe_intermediate_size=24, shared_expert_intermediate_size=56,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                mlp_only_layers=[1], qkv_bias=True)),
    "qwen2_moe-step2-mlp_only": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # MoE on layer 1 only
                                 dict(num_hidden_layers=4, num_key_value_heads=2,
                                      intermediate_size=40, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=56, num_experts=6,
                                      num_experts_per_tok=2, decoder_sparse_step=2,
                                      mlp_only_layers=[3], qkv_bias=False)),
    "qwen3_moe-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(num_key_value_heads=2, head_dim=16, intermediate_size=40,
                            moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=True, tie_word_embeddings=True)),
    "qwen3_moe-mlp_only": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",  # dense, MoE, dense, MoE
                           dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                                intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=False,
                                mlp_only_layers=[0, 2])),
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
    "deepseek_v3-dense2": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                           dict(num_hidden_layers=4, num_key_value_heads=4, intermediate_size=40,
                                moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=2,
                                num_experts_per_tok=2, first_k_dense_replace=2, kv_lora_rank=12,
                                q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                v_head_dim=8, head_dim=4, n_group=1, topk_group=1,
                                routed_scaling_factor=1.0, norm_topk_prob=False)),
}


def _hf_model(case: str):
    cfg_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(zlib.crc32(case.encode()))
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


def _hf_moe_layers(model) -> tuple[int, ...]:
    return tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))


# fp32 throughout; the two implementations differ by ~1e-6 on logits of magnitude ~2
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_logit_parity_and_export(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    want = _hf_logits(hf, ids)

    ours = moeflow.from_pretrained(tmp_path / "hf")
    assert ours.config.moe_layer_indices() == _hf_moe_layers(hf)
    with torch.no_grad():
        got = ours(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)

    # export → transformers reads it → same layers, same logits
    model_type = save_hf(ours, tmp_path / "out")
    assert model_type == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              attn_implementation="eager").eval()
    assert _hf_moe_layers(back) == _hf_moe_layers(hf)
    torch.testing.assert_close(_hf_logits(back, ids), want, **TOL)


def test_layouts_match_transformers_without_weights():
    """Sparse layers as transformers builds them, for layouts the parity cases do not cover."""
    checked = 0
    for case, changes in [("qwen3_moe-norm", dict(num_hidden_layers=6, decoder_sparse_step=3)),
                          ("qwen3_moe-norm", dict(num_hidden_layers=6, decoder_sparse_step=2,
                                                  mlp_only_layers=[1, 4, 5, 9])),
                          ("qwen2_moe-mlp_only", dict(num_hidden_layers=5,
                                                      mlp_only_layers=[0, 3])),
                          ("deepseek_v2-groups", dict(num_hidden_layers=5,
                                                      first_k_dense_replace=3)),
                          ("deepseek_v3", dict(num_hidden_layers=4, first_k_dense_replace=0))]:
        cfg_cls, model_cls, extra = CASES[case]
        config = getattr(transformers, cfg_cls)(**{**TINY, **extra, **changes})
        with torch.device("meta"):
            hf = getattr(transformers, model_cls)(config)
        ours = config_from_hf(config.to_dict())
        assert ours.moe_layer_indices() == _hf_moe_layers(hf), (case, changes)
        assert config_from_hf(config_to_hf(ours)) == ours
        checked += 1
    assert checked == 5


def test_deepseek_moe_layer_freq_follows_deepseek_not_transformers(tmp_path):
    """transformers ignores moe_layer_freq; DeepSeek's own code and checkpoints do not."""
    cfg_cls, model_cls, extra = CASES["deepseek_v2-groups"]
    config = getattr(transformers, cfg_cls)(**{**TINY, **extra, "num_hidden_layers": 5,
                                               "first_k_dense_replace": 1, "moe_layer_freq": 2})
    with torch.device("meta"):
        assert _hf_moe_layers(getattr(transformers, model_cls)(config)) == (1, 2, 3, 4)
    ours = config_from_hf(config.to_dict())
    assert ours.moe_layer_indices() == (2, 4)  # i >= first_k_dense_replace and i % freq == 0
    assert ours.ffn_specs()[3].kind == "dense" and ours.ffn_specs()[3].d_ff == 40
    with pytest.raises(ValueError, match=r"^ffn_layout\[3\]='dense' follows MoE layer 2: .*"
                                         r"moe_layer_freq"):
        config_to_hf(ours)


def test_moeflow_checkpoint_round_trip_sharded(tmp_path):
    from moeflow.interop import save_pretrained
    from moeflow.interop.convert import convert

    hf = _hf_model("qwen2_moe-shared-nonorm")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several shards + index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = moeflow.from_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "mf", max_shard_bytes=50_000)
    assert len(list((tmp_path / "mf" / "model").glob("*.safetensors"))) > 1
    again = moeflow.from_pretrained(tmp_path / "mf")
    ids = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
    convert(tmp_path / "mf", tmp_path / "hf2", to="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(hf, ids), **TOL)
