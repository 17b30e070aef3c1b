"""`moeflow generate` on a trained checkpoint, through the engine: it equals the full forward,
seeds reproduce, stop tokens and stop strings cut the text."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import pytest
import torch

from moeflow.cli import main
from moeflow.infer import Engine, EngineConfig, SamplingParams, generate_text
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


def one_slot(model) -> Engine:
    return Engine(model, EngineConfig(max_batch_size=1))


def test_engine_greedy_equals_the_full_forward(run_dir):
    """The micro model routes top-1 with capacity and jitter noise when it trains: the engine
    (left in training mode here) must route as the full forward with inference=True does."""
    model, tokenizer = load_for_inference(run_dir)
    model.train()
    prompts = [tokenizer.encode("def load(s, *, cls=None):\n    "), tokenizer.encode("x = ")]
    steps = 32 - max(map(len, prompts))  # no stop token: runs to the end of the context
    engine = Engine(model, EngineConfig(max_batch_size=2))
    seen: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda rid, row: seen.setdefault(rid, []).append(row.clone())
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=steps, temperature=0))
    assert model.training
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert len(out) == steps
        with torch.no_grad():
            full = model(torch.tensor([prompt + out]), inference=True).logits[0]
        ref = full[len(prompt) - 1:len(prompt) - 1 + steps]
        torch.testing.assert_close(torch.stack(seen[f"req-{i}"]), ref, rtol=1e-4, atol=1e-4)
        assert ref.argmax(-1).tolist() == out


def test_sampling_is_reproducible_with_a_seed(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    engine = one_slot(model)
    texts = [generate_text(engine, tokenizer, "import ", SamplingParams(
        max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=seed,
        stop_token_ids=tokenizer.eos_ids)) for seed in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_generate_text_cuts_at_the_first_stop_token(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    engine = one_slot(model)
    # Seeded sampling: the barely trained model's greedy output may repeat one token.
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=0)
    ids = engine.generate([tokenizer.encode("x = ")], sampled)[0]
    stop = next(t for t in ids[1:] if t != ids[0])  # first seen after the start: a real cut
    cut = ids[:ids.index(stop)]
    assert 0 < len(cut) < len(ids)
    text = generate_text(engine, tokenizer, "x = ", replace(sampled, stop_token_ids=(stop,)))
    assert text == tokenizer.decode(cut)
    full = generate_text(engine, tokenizer, "x = ", sampled)  # no stop tokens: nothing is cut
    assert full == tokenizer.decode(ids)


def test_prompt_longer_than_the_context_is_refused_and_empty_starts_a_document(run_dir):
    model, tokenizer = load_for_inference(run_dir)
    engine = one_slot(model)
    with pytest.raises(ValueError, match="the context is 32"):
        generate_text(engine, tokenizer, "x = 1\n" * 40, SamplingParams(temperature=0))
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    assert generate_text(engine, tokenizer, "", greedy) == \
        tokenizer.decode(engine.generate([[tokenizer.eot_id]], greedy)[0])


def test_generate_cli(run_dir):
    def cli(*extra):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                       "--max-new-tokens", "12", *extra])
        return rc, out.getvalue()

    rc, greedy = cli("--temperature", "0")
    assert rc == 0 and greedy.startswith("def ")
    model, tokenizer = load_for_inference(run_dir)
    ids = one_slot(model).generate([tokenizer.encode("def ")],
                                   SamplingParams(max_new_tokens=12, temperature=0))[0]
    if tokenizer.eot_id in ids:
        ids = ids[:ids.index(tokenizer.eot_id)]
    assert greedy == "def " + tokenizer.decode(ids) + "\n"
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


def test_generate_help_describes_the_engine_and_stop_sequences(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--stop-sequences TEXT [TEXT ...]" in help_text
    assert "stop when the generated text contains one of these strings" in help_text
    assert "through the serving engine" in help_text and "--no-cache" not in help_text


def test_generate_cli_with_gpu_memory_offloads_and_gives_the_same_text(run_dir):
    def cli(*extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ",
                       "--max-new-tokens", "10", "--temperature", "0", "--device", "cpu",
                       *extra])
        return rc, out.getvalue(), err.getvalue()

    rc, resident, err = cli()
    assert rc == 0, err
    assert cli("--gpu-memory", "1GiB", "--expert-cache-policy", "lfu") == (0, resident, "")
    rc, _, err = cli("--expert-cache-policy", "lfu")
    assert rc == 2 and err == "moeflow: error: --expert-cache-policy needs --gpu-memory\n"
    rc, _, err = cli("--gpu-memory", "lots")
    assert rc == 2 and err.startswith("moeflow: error: gpu_memory='lots': must be a size")
    rc, _, err = cli("--gpu-memory", "100KB")
    assert rc == 2 and err.count("\n") == 1 and "below the" in err and "minimal expert cache" in err
    # A prompt whose KV need exceeds what a sequence's cache holds (max_new_tokens is capped
    # by the room left, see generate_text): one line.
    out, err_io = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_io):
        rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "def f(): pass\n" * 200,
                   "--device", "cpu", "--gpu-memory", "1GiB"])
    err = err_io.getvalue()
    assert rc == 2 and err.count("\n") == 1 and out.getvalue() == "", err
    assert err.startswith("moeflow: error: prompt has ") and "; the context is " in err
