"""Multi-rank inference on gloo: tensor slicing × expert parallelism (× expert slicing) against
the 1-process engine, plain and coordinated all-to-all, and the layout checks.

Each multi-rank test is one spawn running several layouts and models back to back (process
start-up dominates the cost). Every rank reads its shard from a checkpoint the 1-process model
wrote, or (kind "trained") from the checkpoint an EP=2 training run wrote at the start of the
2-rank spawn, served at TP=2 there and at EP=4 (expert slicing) by the 4-rank one, or (kind
"hf-dsv3") straight from a HF DeepSeek-V3 directory, each rank reading its slices; rank 0
drives the request script of tests/infer_workers.py (joins, an abort, a request that stops on
its first token) and must produce the reference's greedy tokens, with logits
within fp32 rounding of the reference's (the sums run in a different order across ranks)."""

import dataclasses

import pytest
import torch

from moeflow import ModelConfig, RouterConfig
from moeflow.checkpoint import load_model, write_weights
from moeflow.infer import Engine, SamplingParams
from moeflow.parallel.inference import InferenceParallel, check_layout

from moeflow.interop.pretrained import find_model_dir, from_pretrained, save_hf

from _train_small import write_word_corpus
from infer_workers import (CONFIGS, ENGINE, VOCAB, drive, engine_worker, make_model,
                           trained_config)
from parallel_workers import spawn


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (checkpoint root, reference result, full parameter count)}."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in CONFIGS:
        model = make_model(kind)
        (root / kind).mkdir()
        write_weights(root / kind, model)
        out[kind] = reference(root, model)
    # DeepSeek-V3 (MLA, shared expert, sigmoid router) as a HF directory: per-expert
    # gate/up/down tensors, q/k/v-style names; the ranks read it without conversion.
    assert save_hf(make_model("mla"), root / "hf-dsv3") == "deepseek_v3"
    out["hf-dsv3"] = reference(root, from_pretrained(root / "hf-dsv3"))
    return out


def reference(root, model):
    # The ranks decode one step at a time (the step broadcast carries the tokens), so the
    # reference does too: the script aborts a request mid-generation, and which of its tokens
    # were reported by then depends on that.
    engine = Engine(model, dataclasses.replace(ENGINE, pipelined_decode=False))
    return root, drive(engine), sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    """The 2-rank spawn: first an EP=2 training run checkpoints the PR-MoE (every rank its own
    chunks) under <root>/trained, then the scenarios serve, and rank 1 dies at the end; adds
    the trained checkpoint's 1-process reference to `checkpoints` as "trained"."""
    root = next(iter(checkpoints.values()))[0]
    tmp = tmp_path_factory.mktemp("two")
    corpus = write_word_corpus(tmp_path_factory.mktemp("corpus"),
                               "every rank reads its slices of the experts", docs=2,
                               words_per_doc=300)
    train = dict(model_config=str(trained_config(tmp / "gpt.json")), data=(str(corpus),),
                 seq_len=16, steps=2, save_every=2, batch_size=4, val_every=100, val_batches=1,
                 device="cpu", progress=False, lr=3e-3, out=str(root / "trained"))
    results = spawn(engine_worker, 2, (TWO_RANKS, str(root), str(tmp), train), tmp,
                    timeout_s=150)
    ckpt = find_model_dir(root / "trained")
    assert ckpt.is_training and len(list((ckpt.path / "model").glob("*.safetensors"))) == 2
    checkpoints["trained"] = reference(root, load_model(ckpt.path))
    return results


def assert_matches(got, ref):
    assert got["tokens"] == ref["tokens"]
    assert got["logits"].keys() == ref["logits"].keys()
    for key, want in ref["logits"].items():
        # fp32: a few ulps of the logits' scale, times the depth of reordered sums
        bound = 64 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got["logits"][key], want, rtol=0, atol=bound)


def check(checkpoints, scenarios, results):
    for name, (kind, *_ ) in scenarios.items():
        _, ref, full = checkpoints[kind]
        assert_matches(results[0][name], ref)
        held = [r[f"{name}/params"] for r in results]
        assert max(held) < full, f"{name}: a rank holds the whole model"


TWO_RANKS = {"gpt ep2": ("gpt", 1, 2, "coordinated"),
             "qwen3 ep2": ("qwen3", 1, 2, "coordinated"),
             "qwen3 ep2 plain": ("qwen3", 1, 2, "plain"),
             "gpt tp2": ("gpt", 2, 1, "coordinated"),
             "mla tp2": ("mla", 2, 1, "plain"),
             "trained tp2": ("trained", 2, 1, "coordinated"),
             "hf dsv3 ep2": ("hf-dsv3", 1, 2, "coordinated")}


def test_two_ranks_ep2_and_tp2_equal_one_process_and_a_dead_rank_fails_fast(checkpoints,
                                                                          two_ranks):
    """...and when rank 1 then dies, rank 0's next step raises at once instead of hanging (the
    gloo connection closes; a stalled rank would hit the process group's timeout, 60 s here).
    "trained tp2": the checkpoint the EP=2 training run wrote serves at TP=2."""
    check(checkpoints, TWO_RANKS, two_ranks)
    results = two_ranks
    assert results[0]["qwen3 ep2"]["tokens"] == results[0]["qwen3 ep2 plain"]["tokens"]
    assert results[0]["after kill"].startswith("RuntimeError"), results[0]["after kill"]
    assert results[0]["after kill s"] < 30


def test_four_ranks_tp2_ep2_and_expert_slicing_equal_one_process(checkpoints, two_ranks,
                                                                 tmp_path):
    # gpt at EP=4: its 2-expert layer is sliced (each expert's d_ff over 2 ranks), its 4-expert
    # layer has one expert per rank; "trained ep4": the same for the EP=2 training checkpoint.
    scenarios = {"qwen3 tp2xep2": ("qwen3", 2, 2, "coordinated"),
                 "qwen3 tp2xep2 plain": ("qwen3", 2, 2, "plain"),
                 "gpt ep4 sliced": ("gpt", 1, 4, "coordinated"),
                 "mla tp2xep2": ("mla", 2, 2, "coordinated"),
                 "trained ep4": ("trained", 1, 4, "coordinated"),
                 "hf dsv3 tp2xep2": ("hf-dsv3", 2, 2, "coordinated")}
    root = next(iter(checkpoints.values()))[0]
    results = spawn(engine_worker, 4, (scenarios, str(root)), tmp_path, timeout_s=150)
    check(checkpoints, scenarios, results)
    assert (results[0]["qwen3 tp2xep2"]["tokens"]
            == results[0]["qwen3 tp2xep2 plain"]["tokens"])
    # Only expert slice 0 of each sliced expert holds its output bias: the slices differ.
    assert len({r["gpt ep4 sliced/params"] for r in results}) == 2


def test_script_on_one_process_equals_each_request_alone(checkpoints):
    """The script's joins, abort and first-token stop change no request's tokens (a request
    admitted behind one that stops at once prefills into the slot it then holds)."""
    _, ref, _ = checkpoints["qwen3"]
    model = make_model("qwen3")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 4, 5, 2)]
    for i, prompt in enumerate(prompts):
        alone = Engine(model, ENGINE).generate([prompt], SamplingParams(max_new_tokens=5,
                                                                         temperature=0))[0]
        got = ref["tokens"][f"r{i}"]
        assert got == alone[:len(got)], f"r{i}"


def tiny(**kw):
    return ModelConfig(**{**dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2,
                                 moe_every=1, num_experts=4, expert_d_ff=16,
                                 router=RouterConfig(top_k=2, dropless=True)), **kw})


@pytest.mark.parametrize("config, tp, ep, world, needle", [
    (tiny(), 2, 2, 2, "needs tp × ep = 4 processes, but 2 were started"),
    (tiny(), 3, 1, 3, "n_heads = 4 is not divisible by tp=3"),
    (tiny(arch="llama", n_kv_heads=1), 2, 1, 2, "n_kv_heads (key/value heads) = 1"),
    (tiny(num_experts=6), 1, 4, 4, "6 experts cannot be split evenly"),
    (tiny(num_experts=3), 2, 2, 4, "3 experts do not divide ep=4"),
    (tiny(num_experts=2, expert_d_ff=18), 1, 8, 8, "expert_d_ff=18 is not divisible by 4"),
    (tiny(arch="llama", qk_norm=True, qk_norm_scope="full"), 2, 1, 2, "qk_norm_scope='full'"),
])
def test_layouts_that_do_not_fit_fail_in_one_line_before_loading(config, tp, ep, world, needle):
    with pytest.raises(ValueError, match="^--tp") as err:
        check_layout(config, InferenceParallel(tp=tp, ep=ep), world)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_hf_experts_fused_over_experts_read_the_same_chunks(checkpoints, tmp_path):
    """transformers ≥ 5 stores experts fused ([E, 2F, D] gate_up, [E, D, F] down): the chunk
    reader takes them as it takes per-expert tensors (here a whole-model chunk of each)."""
    from safetensors.torch import load_file, save_file

    from moeflow.checkpoint.chunks import model_chunks
    from moeflow.interop.hf_shard import read_hf_chunks
    from moeflow.interop.hf_weights import SafetensorsDir

    src = next(iter(checkpoints.values()))[0] / "hf-dsv3"
    state, fused = load_file(src / "model.safetensors"), {}
    for name, t in state.items():
        head, sep, tail = name.partition("experts.")
        if not sep or not tail[0].isdigit():
            fused[name] = t
            continue
        pre = head + "experts."
        ids = range(sum(1 for k in state if k.startswith(pre) and k.endswith("down_proj.weight")))
        fused[head + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{head}experts.{e}.gate_proj.weight"],
                        state[f"{head}experts.{e}.up_proj.weight"]]) for e in ids])
        fused[head + "experts.down_proj"] = torch.stack(
            [state[f"{head}experts.{e}.down_proj.weight"] for e in ids])
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(fused, tmp_path / "model.safetensors")
    want = from_pretrained(src)
    with torch.device("meta"):
        got = type(want)(want.config)
    got = got.to_empty(device="cpu")
    read_hf_chunks(want.config, "deepseek_v3", SafetensorsDir(tmp_path), model_chunks(got),
                   str(tmp_path))
    for name, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name
