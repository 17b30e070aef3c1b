"""`moeflow convert --to hf` keeps pre-gate heads (moeflow.model.pregate): for the GPT family
(remote-code export) and an HF family (Mixtral), the heads come back from the export bit for bit
and through `--to moeflow` again, the summary line names them, and transformers loads the
export without them, computing the logits moeflow computes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

if sys.version_info < (3, 11):
    pytest.skip("transformers 5 needs Python >= 3.11", allow_module_level=True)

import transformers  # noqa: E402

import moeflow  # noqa: E402
from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.cli import main  # noqa: E402
from moeflow.interop import save_pretrained  # noqa: E402

CASES = {
    "moeflow_gpt": ModelConfig(name="gpt-pg", arch="gpt", vocab_size=128, n_layers=4, d_model=32,
                               n_heads=2, max_seq_len=32, moe_kind="residual_moe", moe_every=2,
                               num_experts=(4, 8), router=RouterConfig(top_k=1, min_capacity=2),
                               pregate=True),
    "mixtral": ModelConfig(name="mix-pg", arch="llama", vocab_size=128, n_layers=3, d_model=32,
                           n_heads=2, n_kv_heads=1, d_ff=64, expert_d_ff=32, max_seq_len=32,
                           moe_every=1, first_moe_layer=0, num_experts=4,
                           router=RouterConfig(top_k=2, dropless=True, normalize_topk=True),
                           pregate=True, pregate_rank=8, pregate_depth=2),
}


@pytest.mark.parametrize("model_type", list(CASES))
def test_convert_to_hf_keeps_pregate_heads(model_type, tmp_path, capsys):
    torch.manual_seed(0)
    ours = Transformer(CASES[model_type]).eval()
    with torch.no_grad():  # heads unlike the routers they start from
        for name, t in ours.pregate.named_parameters():
            t.normal_()
    save_pretrained(ours, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    summary = capsys.readouterr().out
    assert model_type in summary and "pre-gate heads kept" in summary
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type

    back = moeflow.from_pretrained(tmp_path / "hf")
    assert back.config.pregate and back.config.pregate_rank == ours.config.pregate_rank
    assert back.config.pregate_depth == ours.config.pregate_depth
    assert len(back.pregate) == len(ours.pregate) >= 1
    want, got = ours.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf"), "--to", "moeflow"]) == 0
    again = moeflow.from_pretrained(tmp_path / "mf")
    heads = ours.pregate.state_dict()
    assert again.pregate.state_dict().keys() == heads.keys()
    assert all(torch.equal(t, heads[n]) for n, t in again.pregate.state_dict().items())

    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=model_type == "moeflow_gpt").eval()
    assert not any("pregate" in n for n in theirs.state_dict())
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids, inference=True).logits,
                                   rtol=1e-5, atol=1e-5)
