"""`moeflow upcycle`: dense → MoE by expert copies (sparse upcycling) or neuron partitions
(Read-ME), and `moeflow train --init` continuing from the result.

The dense models are tiny: a GPT (biases, GELU, tied head) trained for two steps on a copy of
the standard library's json package, a Llama-style model (SwiGLU, no biases, untied) with random
weights, and tiny random HF Llama/Qwen2 models built with transformers.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from moeflow.cli import main
from moeflow.config import ModelConfig
from moeflow.data.tokenizer import BPETokenizer
from moeflow.interop.pretrained import from_pretrained, save_pretrained
from moeflow.interop.upcycle import UpcycleConfig, upcycle
from moeflow.model import Transformer
from moeflow.model.transformer import parameter_counts
from moeflow.serve.loader import load_for_serving
from moeflow.train import TrainConfig
from moeflow.train.checkpoint import load_for_inference
from moeflow.train.trainer import Trainer

DENSE_GPT = {"name": "dense", "arch": "gpt", "vocab_size": 320, "n_layers": 2, "d_model": 32,
             "n_heads": 2, "max_seq_len": 32}
DENSE_LLAMA = {"name": "dense-llama", "arch": "llama", "vocab_size": 320, "n_layers": 3,
               "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48, "max_seq_len": 32}


def _train(out: Path, data: Path, **kw) -> Trainer:
    trainer = Trainer(TrainConfig(data=(str(data),), steps=2, batch_size=4, val_every=2,
                                  val_batches=2, out=str(out), progress=False, **kw))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, corpus) -> Path:
    """A dense GPT moeflow training run (its latest checkpoint is the upcycling source)."""
    root = tmp_path_factory.mktemp("dense")
    (root / "dense.json").write_text(json.dumps(DENSE_GPT))
    _train(root / "run", corpus, model_config=str(root / "dense.json"))
    return root / "run"


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory, corpus) -> Path:
    """A dense Llama-style model in moeflow's layout, random weights, with a tokenizer."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_dict(DENSE_LLAMA))
    with torch.no_grad():  # larger than the init so activations vary between neurons
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    save_pretrained(model, root / "model")
    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))]
    BPETokenizer.train(texts, 320).save(root / "model" / "tokenizer.json")
    return root / "model"


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids, inference=True).logits


def _upcycle(src: Path, out: Path, corpus: Path, **kw):
    kw.setdefault("calib_data", (str(corpus),))
    kw.setdefault("calib_tokens", 512)
    return upcycle(UpcycleConfig(source=str(src), out=str(out), **kw))


# ---- copy: the upcycled model is the dense model ----------------------------------------------

@pytest.mark.parametrize("experts,top_k", [(4, 1), (3, 1), (4, 2)])
def test_copy_with_uniform_router_gives_the_dense_logits_exactly(dense_run, corpus, tmp_path,
                                                                 experts, top_k):
    result = _upcycle(dense_run, tmp_path / "moe", corpus, experts=experts, top_k=top_k)
    dense, _ = load_for_inference(dense_run)
    moe, _ = load_for_inference(tmp_path / "moe")  # what `moeflow generate` loads
    assert moe.config.moe_layer_indices() == (0, 1)
    for layer in moe.moe_layers():
        assert torch.count_nonzero(layer.router.gate.weight) == 0  # uniform routing
    ids = _ids(DENSE_GPT["vocab_size"])
    out = moe(ids, inference=True)
    # every token's combine weight: E/k · 1/E = 1/k per expert (1 at top-1)
    torch.testing.assert_close(_logits(dense, ids), out.logits, rtol=0, atol=0)
    assert result.report["routed_scaling"] == experts / top_k


def _dense_counts(c: dict) -> tuple[int, int, int]:
    """(parameters outside the FFNs, one dense GPT FFN's, one GPT layer's attention+norms)."""
    V, T, d, F_ = c["vocab_size"], c["max_seq_len"], c["d_model"], 4 * c["d_model"]
    attn = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d)
    ffn = d * F_ + F_ + F_ * d + d
    outside = V * d + T * d + c["n_layers"] * attn + 2 * d  # tied head, final LayerNorm
    return outside, ffn, F_


@pytest.mark.parametrize("method,experts,top_k", [("copy", 4, 1), ("copy", 4, 2),
                                                  ("partition", 4, 1), ("partition", 8, 2)])
def test_parameter_counts_match_the_formula(dense_run, corpus, tmp_path, method, experts, top_k):
    c, L, E, k = DENSE_GPT, DENSE_GPT["n_layers"], experts, top_k
    d = c["d_model"]
    outside, ffn, F_ = _dense_counts(c)
    if method == "copy":  # E copies of the FFN + the router
        total_layer = E * d + E * ffn
        active_layer = E * d + k * ffn
    else:  # the FFN's weights once, E shares of the output bias, the router
        expert = 2 * d * (F_ // E) + F_ // E + d
        total_layer = E * d + E * expert
        active_layer = E * d + k * expert
    result = _upcycle(dense_run, tmp_path / "moe", corpus, experts=E, top_k=k, method=method)
    assert result.params_dense == (outside + L * ffn,) * 2
    assert result.params_moe == (outside + L * total_layer, outside + L * active_layer)
    assert parameter_counts(result.config) == result.params_moe
    assert result.report["params_moe"] == {"total": result.params_moe[0],
                                           "active": result.params_moe[1]}


# ---- partition: every neuron in exactly one expert --------------------------------------------

def _neuron_of(columns: torch.Tensor) -> dict[bytes, int]:
    return {columns[:, f].contiguous().numpy().tobytes(): f for f in range(columns.shape[1])}


@pytest.mark.parametrize("source", ["gpt", "llama"])
def test_partition_places_every_neuron_in_exactly_one_expert(dense_run, dense_llama, corpus,
                                                             tmp_path, source):
    src = dense_run if source == "gpt" else dense_llama
    E = 4
    result = _upcycle(src, tmp_path / "moe", corpus, experts=E, top_k=2, method="partition")
    dense = load_for_inference(src)[0] if source == "gpt" else from_pretrained(src)
    moe = from_pretrained(tmp_path / "moe")  # what `moeflow serve` loads
    swiglu = source == "llama"
    for i, layer in enumerate(moe.moe_layers()):
        mlp = dense.blocks[i].ffn
        F_, G = mlp.fc_out.weight.shape[1], layer.experts.d_ff
        assert G * E == F_
        by_out = _neuron_of(mlp.fc_out.weight.detach())
        seen = []
        for e in range(E):
            for j in range(G):
                f = by_out[layer.experts.w_out_EFD[e, j].detach().numpy().tobytes()]
                seen.append(f)
                w_in = mlp.fc_in.weight.detach()
                assert torch.equal(layer.experts.w_in_EDI[e, :, j], w_in[f])
                if swiglu:  # the same neuron's up projection sits G columns later
                    assert torch.equal(layer.experts.w_in_EDI[e, :, G + j], w_in[F_ + f])
                else:
                    assert layer.experts.b_in_EI[e, j] == mlp.fc_in.bias[f]
        assert sorted(seen) == list(range(F_)) and Counter(seen).most_common(1)[0][1] == 1
        assert len({tuple(sorted(seen[e * G:(e + 1) * G])) for e in range(E)}) == E
    for q in result.report["layers"].values():  # measured on held-out calibration tokens
        assert q["coactivation_within"] > q["coactivation_random_split"]
        assert q["rel_error_oracle"] <= q["rel_error_router"] < q["rel_error_random"]


@pytest.mark.parametrize("source", ["gpt", "llama"])
def test_partition_with_all_experts_active_sums_to_the_dense_mlp(dense_run, dense_llama, corpus,
                                                                 tmp_path, source):
    src = dense_run if source == "gpt" else dense_llama
    _upcycle(src, tmp_path / "moe", corpus, experts=4, top_k=4, method="partition",
             router_init="zero")
    dense = load_for_inference(src)[0] if source == "gpt" else from_pretrained(src)
    moe = from_pretrained(tmp_path / "moe")
    ids = _ids(320, seed=1)
    # the groups' partial sums in another order than one matmul: fp32 rounding only
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=1e-5, atol=1e-5)


def test_partition_is_deterministic_given_the_seed(dense_llama, corpus, tmp_path):
    a = _upcycle(dense_llama, tmp_path / "a", corpus, experts=4, method="partition", seed=3)
    b = _upcycle(dense_llama, tmp_path / "b", corpus, experts=4, method="partition", seed=3)
    c = _upcycle(dense_llama, tmp_path / "c", corpus, experts=4, method="partition", seed=4)
    assert a.report["groups_digest"] == b.report["groups_digest"]
    # the stored tensors, not the files' bytes: the safetensors header's key order is not fixed
    wa = from_pretrained(tmp_path / "a").state_dict()
    wb = from_pretrained(tmp_path / "b").state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert c.report["groups_digest"] != a.report["groups_digest"]


# ---- HF dense sources ------------------------------------------------------------------------

@pytest.mark.skipif(sys.version_info < (3, 11), reason="transformers 5 needs Python >= 3.11")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_dense_source_upcycles_to_its_own_logits(tmp_path, arch):
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    config = getattr(transformers, cfg_cls)(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64,
        tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.08)
    hf.save_pretrained(tmp_path / "hf")
    upcycle(UpcycleConfig(source=str(tmp_path / "hf"), experts=2, out=str(tmp_path / "moe")))
    moe = from_pretrained(tmp_path / "moe")
    assert moe.config.num_experts == (2, 2)
    ids = _ids(96)
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(_logits(moe, ids), want, rtol=1e-5, atol=1e-5)


# ---- the output is a normal checkpoint: generate, serve, train --init -------------------------

def test_train_init_generate_and_serve_read_the_upcycled_checkpoint(dense_run, corpus, tmp_path,
                                                                    capsys):
    _upcycle(dense_run, tmp_path / "moe", corpus, experts=4, top_k=1)
    assert main(["generate", "--checkpoint", str(tmp_path / "moe"), "--prompt", "def ",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    served = load_for_serving(tmp_path / "moe", device="cpu")
    assert served.kind == "moeflow" and served.tokenizer.eos_ids == (0,)

    # Continued training from the upcycled weights and from the dense weights themselves: the
    # step-0 validation (same data, same tokenizer, dropless evaluation) must agree.
    moe = _train(tmp_path / "moe-run", corpus, init=str(tmp_path / "moe"))
    dense = _train(tmp_path / "dense-run", corpus, init=str(dense_run))
    rows_moe = _val_losses(tmp_path / "moe-run")
    rows_dense = _val_losses(tmp_path / "dense-run")
    assert rows_moe[0][0] == rows_dense[0][0] == 0
    assert rows_moe[0][1] == pytest.approx(rows_dense[0][1], rel=1e-6)
    assert rows_moe[-1][0] == 2 and moe.model_config.is_moe and not dense.model_config.is_moe
    # resuming an --init run needs nothing but the run itself
    assert main(["train", "--out", str(tmp_path / "moe-run"), "--resume", "--steps", "3",
                 "--no-progress"]) == 0
    assert _val_losses(tmp_path / "moe-run")[-1][0] == 3


def _val_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


# ---- bad input: one line each ----------------------------------------------------------------

def test_bad_input_is_one_line_errors(dense_run, corpus, tmp_path, capsys):
    moe = tmp_path / "moe"
    _upcycle(dense_run, moe, corpus, experts=4)
    cases = [
        (["--from", str(tmp_path / "nope"), "--experts", "4"], "does not exist"),
        (["--from", str(moe), "--experts", "4"], "is already an MoE"),
        (["--from", str(dense_run), "--experts", "3", "--method", "partition"],
         "--experts 3 does not divide the FFN width d_ff=128"),
        (["--from", str(dense_run), "--experts", "2", "--top-k", "3"], "top_k=3"),
        (["--from", str(dense_run), "--experts", "2", "--router-init", "fit"],
         "fit needs --method partition"),
        (["--from", str(dense_run), "--experts", "2", "--moe-every", "5"], "leaves no MoE layer"),
    ]
    for i, (argv, message) in enumerate(cases):
        assert main(["upcycle", *argv, "--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moeflow: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / f"out{i}").exists()
    assert main(["upcycle", "--from", str(dense_run), "--experts", "2", "--out", str(moe)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--init", str(moe), "--preset", "tiny"]) == 2
    assert "--init takes the network" in capsys.readouterr().err
