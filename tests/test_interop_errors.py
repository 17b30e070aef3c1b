"""Checkpoints moeflow cannot load exactly are refused with errors naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeflow
from moeflow import ModelConfig, RouterConfig, Transformer
from moeflow.interop import config_from_hf, config_to_hf, save_hf, save_pretrained


def _tiny(**kw) -> ModelConfig:
    base = dict(name="t", arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4,
                n_kv_heads=2, d_ff=48, expert_d_ff=16, max_seq_len=64, moe_every=1,
                num_experts=4, qk_norm=True, router=RouterConfig(top_k=2, normalize_topk=True))
    return ModelConfig(**{**base, **kw})


def _export(tmp_path, config=None):
    torch.manual_seed(0)
    model = Transformer(config or _tiny()).eval()
    save_hf(model, tmp_path)
    return model


def test_unknown_architecture_is_named(tmp_path):
    _export(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "jamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='jamba'"):
        moeflow.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _export(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    gone = "model.layers.1.mlp.experts.3.down_proj.weight"
    kept = {k: v for k, v in tensors.items() if k != gone}
    save_file(kept, path)
    with pytest.raises(ValueError, match=f"missing tensor '{gone}'"):
        moeflow.from_pretrained(tmp_path)
    save_file({**tensors, "model.layers.0.mlp.bonus.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.bonus.weight'"):
        moeflow.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    _export(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'final_norm.weight'.*shape"):
        moeflow.from_pretrained(tmp_path)


def test_unsupported_hf_fields_are_named(tmp_path):
    _export(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        moeflow.from_pretrained(tmp_path)


def test_export_refuses_what_hf_cannot_express():
    # the GPT family has no transformers class: it exports as moeflow's remote-code model
    tiny = moeflow.ModelConfig.from_name("tiny")
    hf = config_to_hf(tiny)
    assert hf["model_type"] == "moeflow_gpt" and config_from_hf(hf) == tiny
    with pytest.raises(ValueError, match=r"^moeflow_gpt: moeflow.arch='llama'"):
        config_from_hf({**hf, "moeflow": _tiny().to_dict()})
    with pytest.raises(ValueError, match=r"^moe_kind='residual_moe': Residual-MoE layers have "
                                         r"no HF counterpart of the Llama family"):
        config_to_hf(_tiny(moe_kind="residual_moe"))
    with pytest.raises(ValueError, match="num_experts"):
        config_to_hf(_tiny(num_experts=(4, 8)))
    with pytest.raises(ValueError, match="router.routed_scaling"):
        config_to_hf(_tiny(router=RouterConfig(top_k=2, normalize_topk=True, routed_scaling=2.0)))


def test_moeflow_checkpoint_missing_tensor(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Transformer(moeflow.ModelConfig.from_name("tiny")), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["tensors"]["blocks.1.ffn.router.gate.weight"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"tensor 'blocks.1.ffn.router.gate.weight' \[4, 128\] "
                                         r"is missing from the checkpoint"):
        moeflow.from_pretrained(tmp_path)
    manifest["version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format version 3; this moeflow reads "
                                         r"'moeflow-checkpoint' version 2"):
        moeflow.from_pretrained(tmp_path)


def test_cli_convert_round_trip(tmp_path, capsys):
    from moeflow.cli import main

    torch.manual_seed(0)
    model = Transformer(_tiny()).eval()
    save_pretrained(model, tmp_path / "mf")
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf2"), "--to", "moeflow"]) == 0
    back = moeflow.from_pretrained(tmp_path / "mf2")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        # HF routers are dropless, as inference=True routes (the original's config drops).
        assert torch.equal(back(ids).logits, model(ids, inference=True).logits)
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("layout, step, mlp_only", [
    (("moe:4",) * 4, 1, []),
    (("dense", "moe:4", "dense", "moe:4"), 2, []),
    (("dense", "moe:4", "dense", "dense"), 2, [3]),
    (("dense", "dense", "dense", "moe:4"), 4, []),
    (("moe:4", "dense", "moe:4", "moe:4"), 1, [1]),
])
def test_export_writes_any_layout_as_qwen_sparsity(layout, step, mlp_only):
    cfg = _tiny(n_layers=4, moe_every=0, num_experts=(), ffn_layout=layout)
    hf = config_to_hf(cfg)
    assert (hf["model_type"], hf["decoder_sparse_step"], hf["mlp_only_layers"]) == \
        ("qwen3_moe", step, mlp_only)
    assert config_from_hf(hf).ffn_layout == layout


def test_layouts_hf_cannot_express_are_refused():
    with pytest.raises(ValueError, match=r"^moe_kind='mixed': Residual-MoE layers have no HF"):
        config_to_hf(_tiny(moe_every=0, num_experts=(), ffn_layout=("residual_moe:4", "moe:4")))
    with pytest.raises(ValueError, match=r"^num_experts=\(4, 8\): HF MoE configs have one expert "
                                         r"count for every MoE layer$"):
        config_to_hf(_tiny(moe_every=0, num_experts=(), ffn_layout=("moe:4", "moe:8")))
    with pytest.raises(ValueError,
                       match=r"^layer 0 kind='dense' cannot be expressed as HF mixtral"):
        config_to_hf(_tiny(qk_norm=False, moe_every=0, num_experts=(),
                           ffn_layout=("dense", "moe:4")))


def test_hf_layouts_without_moe_layers_are_refused():
    hf = config_to_hf(_tiny())
    with pytest.raises(ValueError, match=r"^qwen3_moe: decoder_sparse_step=1, "
                                         r"mlp_only_layers=\[0, 1\] leave no MoE layer"):
        config_from_hf({**hf, "mlp_only_layers": [0, 1]})
    with pytest.raises(ValueError, match=r"^qwen3_moe: decoder_sparse_step=0 is not supported"):
        config_from_hf({**hf, "decoder_sparse_step": 0})
