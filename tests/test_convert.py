"""`moeflow convert` as a user meets it: what `serve` and `generate` load goes in, a checkpoint
that runs comes out — in transformers for `--to hf` (tokenizer, generation config and, for the
GPT family, the remote-code model included), in `moeflow serve` for `--to moeflow`.

Each test builds tiny random-weight models and tokenizers locally (no hub). transformers is
pinned in the [test] extra; it needs Python >= 3.11, the only reason these tests skip.
"""

from __future__ import annotations

import io
import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

if sys.version_info < (3, 11):
    pytest.skip("transformers 5 needs Python >= 3.11", allow_module_level=True)

import transformers  # noqa: E402

import moeflow  # noqa: E402
from moeflow import ModelConfig, RouterConfig, Transformer  # noqa: E402
from moeflow.cli import main  # noqa: E402
from moeflow.data.tokenizer import EOT  # noqa: E402
from moeflow.interop import save_hf, save_pretrained  # noqa: E402
from tests._serve_util import TEXTS, tiny_tokenizer  # noqa: E402

# fp32 throughout: the two implementations differ by float rounding (~1e-6 on logits ~1)
TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 300  # tiny_tokenizer's size, so every id the model can emit decodes


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (norm gains and biases too), so routing and logits are decisive
    and parity checks cannot pass on zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")]
        for name, t in list(model.named_parameters()) + biases:
            if name.endswith("expert_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif "norm" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.8)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.15)


def _gpt(**kw) -> ModelConfig:
    base = dict(name="gpt-t", arch="gpt", vocab_size=VOCAB, n_layers=4, d_model=64, n_heads=4,
                max_seq_len=64, moe_kind="residual_moe", moe_every=2, num_experts=(4, 8),
                router=RouterConfig(top_k=1, min_capacity=2))
    return ModelConfig(**{**base, **kw})


GPT_CASES = {
    # `tiny`'s shape: PR-MoE pyramid (Residual-MoE, 4 then 8 experts), top-1, tied embeddings
    "pr-moe": _gpt(),
    # every other GPT-family option the remote-code class implements
    "top2-shared-sigmoid-groups": _gpt(
        n_kv_heads=2, qk_norm=True, qk_norm_scope="full", mlp_bias=False, attn_out_bias=False,
        tie_embeddings=False, moe_kind=None, moe_every=0, num_experts=(),
        ffn_layout=("moe:8", "dense", "moe:8", "residual_moe:4"), num_shared_experts=1,
        expert_d_ff=48, shared_expert_gate=True,
        router=RouterConfig(top_k=2, score_func="sigmoid", expert_bias=True, num_groups=2,
                            topk_groups=1, routed_scaling=1.5, normalize_topk=True)),
    "top2-deepspeed-rule": _gpt(moe_kind="moe", num_experts=(6, 6), qk_norm=True,
                                router=RouterConfig(top_k=2)),
}


@pytest.mark.parametrize("case", list(GPT_CASES))
def test_gpt_family_exports_to_transformers_with_logit_parity(case, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(GPT_CASES[case]).eval()
    _randomize(ours, zlib.crc32(case.encode()))
    assert save_hf(ours, tmp_path) == "moeflow_gpt"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ids = torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids, inference=True).logits
        got = theirs.eval()(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    # ... and back: the same tensors under the same names
    back = moeflow.from_pretrained(tmp_path)
    assert back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def _training_run(run_dir: Path) -> Path:
    """A training run directory: one checkpoint of a randomized `tiny`-shaped GPT PR-MoE."""
    from moeflow.train.checkpoint import save_checkpoint
    from moeflow.train.run_config import TrainConfig

    cfg = _gpt()
    torch.manual_seed(0)
    model = Transformer(cfg)
    _randomize(model, 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(run_dir, 3, model=model, optimizers=[opt], state={},
                    tokenizer=tiny_tokenizer(), model_config=cfg,
                    run_config=TrainConfig())
    return run_dir


def test_training_run_to_hf_runs_in_transformers_like_moeflow_generate(tmp_path, capsys,
                                                                      monkeypatch):
    run = _training_run(tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["convert", str(run), str(out), "--to", "hf"]) == 0
    assert "moeflow_gpt" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "modeling_moeflow_gpt.py", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name

    # the tokenizer as transformers reads it: moeflow's BPE, <|endoftext|> as bos/eos/pad.
    # Without trust_remote_code transformers asks whether to run the config's code (here: no
    # answer, stdin is empty) and reads the tokenizer all the same.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    ours_tok = tiny_tokenizer()
    for trust in (None, True):
        tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=trust)
        assert len(tok) == ours_tok.vocab_size == VOCAB
        assert tok.eos_token == tok.bos_token == EOT and tok.eos_token_id == ours_tok.eot_id
        for text in TEXTS[:4]:
            assert tok(text).input_ids == ours_tok.encode(text)
    capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.generation_config.eos_token_id == ours_tok.eot_id

    prompt, n = "def hello(name):", 12
    assert main(["generate", "--checkpoint", str(run), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(n)]) == 0
    moeflow_text = capsys.readouterr().out.removesuffix("\n")
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=n, do_sample=False)
    hf_text = prompt + tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert len(moeflow_text) > len(prompt) + 3
    assert hf_text == moeflow_text

    # the export is what `generate` and `serve` load, and converts again (to moeflow and back)
    assert main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(n)]) == 0
    assert capsys.readouterr().out.removesuffix("\n") == moeflow_text
    assert main(["convert", str(out), str(tmp_path / "mf"), "--to", "moeflow"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "mf" / name).read_bytes() == (out / name).read_bytes(), name
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "mf"), "--prompt", prompt,
                 "--temperature", "0", "--max-new-tokens", str(n)]) == 0
    assert capsys.readouterr().out.removesuffix("\n") == moeflow_text


def _hf_tokenizer_dir(path: Path) -> dict[str, int]:
    """An HF-style tokenizer (chat special tokens, chat template, generation config) in `path`;
    returns the special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    fast.save_pretrained(path)
    ids = {"eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    transformers.GenerationConfig(**ids).save_pretrained(path)
    return ids


def test_hf_checkpoint_to_moeflow_keeps_its_tokenizer_and_serves(tmp_path):
    from starlette.testclient import TestClient

    from moeflow.serve.app import create_app
    from moeflow.serve.config import ServeConfig
    from moeflow.serve.server import build_state

    hf_dir = tmp_path / "qwen3"
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=40, moe_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(config).eval()
    _randomize(hf, 3)
    hf.save_pretrained(hf_dir)
    ids = _hf_tokenizer_dir(hf_dir)
    kept = sorted(p.name for p in hf_dir.iterdir()
                  if p.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                        "generation_config")))
    assert len(kept) == 5, kept

    out = tmp_path / "mf"
    assert main(["convert", str(hf_dir), str(out), "--to", "moeflow"]) == 0
    for name in kept:
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name

    # `moeflow serve` on the export, in-process: greedy text equals transformers' own
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt, n = "import os", 8
    enc = tok(prompt, return_tensors="pt")
    gen = hf.generate(**enc, max_new_tokens=n, do_sample=False)
    want = tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    state = build_state(ServeConfig(model=str(out), device="cpu", served_model_name="q"))
    assert state.loaded.kind == "moeflow"
    assert state.loaded.tokenizer.eos_ids[0] == ids["eos_token_id"]
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/completions", json={"model": "q", "prompt": prompt,
                                                 "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        r = client.post("/v1/chat/completions", json={
            "model": "q", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        # the chat template came along: the prompt is the template's, not moeflow's default
        assert r.json()["usage"]["prompt_tokens"] == len(tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
            return_dict=False))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_convert_refuses_an_existing_destination_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "mf"
    torch.manual_seed(0)
    save_pretrained(Transformer(_gpt()), src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    assert main(["convert", str(src), str(dst), "--to", "moeflow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--overwrite" in err
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mf", "out"]  # no temporary left

    for size in ("0", "-1"):  # it wrote one file per tensor
        assert main(["convert", str(src), str(tmp_path / "new"), "--to", "hf",
                     "--max-shard-gb", size]) == 2
        assert f"max_shard_gb={size}: must be at least 1 MiB" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    # a destination that holds the source is refused even with --overwrite
    for holder in (src, tmp_path):
        assert main(["convert", str(src), str(holder), "--to", "moeflow", "--overwrite"]) == 2
        assert "holds the source" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before

    assert main(["convert", str(src), str(dst), "--to", "moeflow", "--overwrite"]) == 0
    assert "weights only" in capsys.readouterr().out  # the source has no tokenizer
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "manifest.json", "model"]
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert main(["convert", str(src), str(tmp_path / "empty"), "--to", "moeflow"]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mf", "out"]
