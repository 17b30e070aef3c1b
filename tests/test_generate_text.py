"""`moeflow generate` on a trained checkpoint: the cache changes nothing, seeds reproduce."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import pytest
import torch

from moeflow.cli import main
from moeflow.infer.generate import generate
from moeflow.infer.text import generate_text
from moeflow.infer.sampling import SamplingParams
from moeflow.train import TrainConfig, Trainer
from moeflow.train.checkpoint import load_for_inference

from _train_small import write_config, write_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cfg = TrainConfig(model_config=str(write_config(root / "micro.json")),
                      data=(str(write_corpus(root / "data")),), out=str(root / "run"), steps=8,
                      batch_size=4, val_every=8, val_batches=2, lr=3e-3, progress=False)
    Trainer(cfg).run()
    return root / "run"


def test_greedy_with_and_without_cache_identical(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    prompt = torch.tensor([tokenizer.encode("def load(s, *, cls=None):\n    ")] * 2)
    params = SamplingParams(max_new_tokens=64, temperature=0)
    cached = generate(model, prompt, params, use_cache=True)
    uncached = generate(model, prompt, params, use_cache=False)
    assert cached.shape == (2, 32 - prompt.shape[1])  # no stop token: runs to the context end
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_with_a_seed(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    stop = (tokenizer.eot_id,)
    texts = [generate_text(model, tokenizer, "import ", SamplingParams(
        max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=seed,
        stop_token_ids=stop)) for seed in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_generate_text_cuts_at_the_first_stop_token(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    # Seeded sampling: the barely trained model's greedy output may repeat one token.
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=0)
    ids = generate(model, torch.tensor([tokenizer.encode("x = ")]), sampled)[0].tolist()
    stop = next(t for t in ids[1:] if t != ids[0])  # first seen after the start: a real cut
    cut = ids[:ids.index(stop)]
    assert 0 < len(cut) < len(ids)
    text = generate_text(model, tokenizer, "x = ", replace(sampled, stop_token_ids=(stop,)))
    assert text == tokenizer.decode(cut)
    full = generate_text(model, tokenizer, "x = ", sampled)  # no stop tokens: nothing is cut
    assert full == tokenizer.decode(ids)


def test_prompt_longer_than_the_context_is_refused(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    with pytest.raises(ValueError, match="the model's context is 32"):
        generate_text(model, tokenizer, "x = 1\n" * 40, SamplingParams(temperature=0))


def test_generate_cli(run_dir):
    def cli(*extra):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                       "--max-new-tokens", "12", *extra])
        return rc, out.getvalue()

    rc, greedy = cli("--temperature", "0")
    assert rc == 0 and greedy.startswith("def ")
    assert cli("--temperature", "0", "--no-cache") == (0, greedy)
    seeded = cli("--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "3")
    assert seeded == cli("--temperature", "0.9", "--top-k", "40", "--top-p", "0.9",
                         "--seed", "3")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["generate", "--checkpoint", str(run_dir), "--top-p", "0"]) == 2
    assert "top_p=0.0: must be a finite number in (0, 1]" in err.getvalue()


def test_generate_cli_stop_sequences_are_text(run_dir):
    """`--stop-sequences sky tree` and `--stop-sequences 5` are strings: the output ends just
    before the first one the text contains, and is unchanged when it contains none."""
    def cli(*extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                       "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "5", *extra])
        assert rc == 0, err.getvalue()
        return out.getvalue()[:-1]  # print's newline

    full = cli()
    continuation = full[len("def "):]
    assert len(continuation) > 6
    for stops in (("sky", "tree"), ("5",)):  # absent from the text: nothing is cut
        absent = [s for s in stops if s not in continuation]
        assert cli("--stop-sequences", *absent) == full
    stop = continuation[3:5]  # present: cut just before its first occurrence
    assert cli("--stop-sequences", "zzz", stop) == "def " + continuation[:continuation.find(stop)]


def test_generate_help_describes_stop_sequences(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--stop-sequences TEXT [TEXT ...]" in help_text
    assert "stop when the generated text contains one of these strings" in help_text
