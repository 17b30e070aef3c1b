"""Experts memory-mapped from the checkpoint's files (expert_store="mmap"), on CPU: the same
greedy tokens and logits as the resident and the pinned offload engines under forced
evictions, nothing of the experts read at load (the views are pages of the files' mappings,
and the process has faulted in almost none of them), the chunked staging copy, and one-line
errors for what cannot be mapped."""

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch

from moeflow import ModelConfig, Transformer
from moeflow.checkpoint import CheckpointError
from moeflow.checkpoint.mapped import MappedExperts, StoredPiece, expert_views
from moeflow.checkpoint.model_dir import load_model, write_weights
from moeflow.cli import main
from moeflow.data.tokenizer import BPETokenizer
from moeflow.infer import Engine, EngineConfig
from moeflow.infer.offload import OffloadConfig
from moeflow.infer.offload.mapped_store import MappedExpertStore
from moeflow.infer.offload.staged_copy import StagedCopy
from moeflow.interop.pretrained import save_hf
from moeflow.serve.loader import load_for_serving
from test_offload import GREEDY, KINDS, budget_for, make_model, prompts, run


def file_mappings(directory: Path) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of files under `directory`."""
    out = []
    root = str(directory.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(root):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def mapped_rss(directory: Path) -> int:
    """Bytes of the files under `directory` that this process has faulted in (smaps Rss)."""
    root, total, inside = str(directory.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].startswith(root)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def assert_equal_runs(a, b):
    (tokens_a, logits_a), (tokens_b, logits_b) = a, b
    assert tokens_a == tokens_b
    assert logits_a.keys() == logits_b.keys()
    for rid in logits_a:
        assert all(torch.equal(x, y) for x, y in zip(logits_a[rid], logits_b[rid], strict=True))


@pytest.mark.parametrize("kind,cpu_experts,file_bytes", [
    ("mixtral", "off", None), ("mixtral", "always", None), ("pr_moe", "off", 20_000)])
def test_mmap_engine_equals_resident_and_pinned_engines_under_evictions(
        tmp_path, kind, cpu_experts, file_bytes):
    """file_bytes: the checkpoint split over several files (the layers' tensors in different
    files): each layer maps from the file holding it."""
    model = make_model(kind)
    write_weights(tmp_path, model, max_file_bytes=file_bytes)
    assert (len(list((tmp_path / "model").iterdir())) > 2) == (file_bytes is not None)
    ps = prompts(2, seed=7 + len(kind))
    _, *resident = run(copy.deepcopy(model), ps, max_batch_size=2)
    slots = model.config.router.top_k + 1
    budget = budget_for(model, slots, max_batch_size=2)
    _, *pinned = run(copy.deepcopy(model), ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget, cpu_experts=cpu_experts))
    mapped = load_model(tmp_path, map_experts=True)
    assert all(isinstance(m.experts, MappedExperts) for m in mapped.moe_layers())
    assert not any(p.numel() for m in mapped.moe_layers() for p in m.experts.parameters())
    engine, *served = run(mapped, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget, cpu_experts=cpu_experts, expert_store="mmap"))
    assert_equal_runs(served, resident)
    assert_equal_runs(served, pinned)
    store, stats = engine.offload.cache.store, engine.stats().offload
    assert isinstance(store, MappedExpertStore)
    assert engine.offload.plan.slots == slots
    if cpu_experts == "off":
        assert stats.cache.copies > slots  # evictions
    else:  # every miss computed on the CPU, from the mapped pages
        assert stats.cpu.experts > 0 and stats.cache.copies == 0
    # Every expert tensor the store serves lies inside a mapping of the checkpoint's files.
    maps = file_mappings(tmp_path / "model")
    for layer in store.layers:
        for ex in layer:
            for t in ex:
                if t is not None:
                    assert any(s <= t.data_ptr() and t.data_ptr() + t.nbytes <= e
                               for s, e, _ in maps)
    # A second engine on the offloaded model reuses the mapped store (another slot count).
    del engine
    again, *served_again = run(mapped, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(model, slots + 1, max_batch_size=2),
        cpu_experts=cpu_experts, expert_store="mmap"))
    assert again.offload.cache.store is store and again.offload.plan.slots == slots + 1
    assert_equal_runs(served_again, resident)
    with pytest.raises(ValueError, match="already moved this model's experts to a 'mmap'"):
        Engine(mapped, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory=budget)))
    # ... and holds the values of the model it was saved from.
    for i, m in enumerate(model.moe_layers()):
        for e in range(m.experts.num_experts):
            assert torch.equal(store.expert(i, e)[0], m.experts.w_in_EDI[e])
            assert torch.equal(store.expert(i, e)[1], m.experts.w_out_EFD[e])


def test_loading_reads_none_of_the_expert_bytes(tmp_path):
    """Experts of 6 MiB: after the mapped load the process has faulted in under 10 % of them
    (a load that read them, or copied them to memory, fails this); serving then reads them
    through the mapping."""
    cfg = ModelConfig(**{**dict(vocab_size=97, n_layers=2, d_model=64, n_heads=4,
                                max_seq_len=24, init_std=0.1), **KINDS["mixtral"],
                         "expert_d_ff": 1024})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    expert_bytes = sum(p.numel() * p.element_size() for m in model.moe_layers()
                       for p in m.experts.parameters())
    assert expert_bytes > 6 << 20
    write_weights(tmp_path, model)
    mapped = load_model(tmp_path, map_experts=True)
    assert file_mappings(tmp_path / "model")
    assert mapped_rss(tmp_path / "model") < 0.1 * expert_bytes
    engine = Engine(mapped, EngineConfig(max_batch_size=1, offload=OffloadConfig(
        device="cpu", gpu_memory=budget_for(mapped, 3, max_batch_size=1), expert_store="mmap")))
    engine.generate(prompts(1, seed=2), GREEDY)
    copied = engine.stats().offload.cache.bytes_copied
    assert copied > 0 and mapped_rss(tmp_path / "model") > 0.5 * min(copied, expert_bytes)


@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.float32),
                                                 (torch.float32, torch.bfloat16)])
def test_staged_copy_in_chunks_equals_a_plain_copy(src_dtype, dst_dtype):
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(*shape, generator=g).to(src_dtype) for shape in ((7, 13), (5,), (3, 4))]
    dsts = [torch.empty(s.shape, dtype=dst_dtype) for s in srcs]
    stage = StagedCopy(torch.device("cpu"), chunk_bytes=40)  # 10 fp32 elements a chunk
    stage.copy(list(zip(dsts, srcs)))
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s.to(dst_dtype))
    assert stage.chunks == 10 + 1 + 2  # ceil(91/10) + ceil(5/10) + ceil(12/10)
    with pytest.raises(ValueError, match="contiguous"):
        stage.copy([(dsts[0], srcs[0].t())])


def test_expert_rows_in_several_pieces_map_and_a_sliced_expert_is_refused():
    w_EDI = torch.randn(8, 3, 4)
    halves = [StoredPiece((0, 0, 0), w_EDI[:5]), StoredPiece((5, 0, 0), w_EDI[5:])]
    views = expert_views("l.w_in_EDI", halves, 8, (3, 4))  # an expert-parallel run's pieces
    assert all(torch.equal(v, w_EDI[e]) for e, v in enumerate(views))
    assert views[6].data_ptr() == w_EDI[6].data_ptr()  # views, not copies
    sliced = [StoredPiece((0, 0, 0), w_EDI[:, :, :2]), StoredPiece((0, 0, 2), w_EDI[:, :, 2:])]
    with pytest.raises(CheckpointError, match="expert-sliced .* --expert-store pinned") as e:
        expert_views("l.w_in_EDI", sliced, 8, (3, 4))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no stored piece holds expert 5"):
        expert_views("l.w_in_EDI", halves[:1], 8, (3, 4))


def test_what_cannot_be_mapped_is_one_line(tmp_path):
    model = make_model("mixtral")
    budget = budget_for(model, 3, max_batch_size=2)
    with pytest.raises(ValueError, match=r"expert_store='mmap': the model's experts are in "
                                         r"memory.*map_experts=True") as e:
        Engine(model, EngineConfig(max_batch_size=2, offload=OffloadConfig(
            device="cpu", gpu_memory=budget, expert_store="mmap")))
    assert "\n" not in str(e.value)
    assert all(not isinstance(m.experts, MappedExperts) for m in model.moe_layers())
    with pytest.raises(ValueError, match="cpu_experts='split' with expert_store='mmap'"):
        OffloadConfig(device="cpu", gpu_memory="1GiB", expert_store="mmap", cpu_experts="split")
    with pytest.raises(ValueError, match="expert_store='disk'"):
        OffloadConfig(device="cpu", gpu_memory="1GiB", expert_store="disk")
    write_weights(tmp_path, model)
    mapped = load_model(tmp_path, map_experts=True)
    with pytest.raises(ValueError, match="memory-mapped .*expert_store='mmap'"):
        mapped(torch.tensor([[1, 2, 3]]), inference=True)
    # A mapped model may still go to the pinned store (its experts read in): same tokens.
    ps = prompts(2, seed=3)
    _, tokens, _ = run(copy.deepcopy(model), ps, max_batch_size=2)
    _, pinned_tokens, _ = run(mapped, ps, max_batch_size=2,
                              offload=OffloadConfig(device="cpu", gpu_memory=budget))
    assert pinned_tokens == tokens
    (tmp_path / "cut").mkdir()  # a copy nothing maps: truncating a mapped file is SIGBUS
    write_weights(tmp_path / "cut", model)
    weights = sorted((tmp_path / "cut" / "model").glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="is damaged or truncated .*byte range") as e:
        load_model(tmp_path / "cut", map_experts=True)
    assert "\n" not in str(e.value)
    save_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="is a HF .* moeflow convert .* --to moeflow") as e:
        load_for_serving(tmp_path / "hf", "cpu", map_experts=True)
    assert "\n" not in str(e.value)


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def saved_mixtral(directory: Path) -> tuple[Transformer, tuple[str, ...]]:
    """A tiny Mixtral-style model with a BPE tokenizer saved to `directory` (float32), and the
    `generate` command line for it (greedy, 8 tokens, CPU)."""
    tokenizer = BPETokenizer.train([Path(json_source()).read_text()], vocab_size=300)
    cfg = ModelConfig(**{**make_model("mixtral").config.to_dict(),
                         "vocab_size": tokenizer.vocab_size, "pregate": False})
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    for layer in model.moe_layers():
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    write_weights(directory, model)
    tokenizer.save(directory / "tokenizer.json")
    return model, ("generate", "--checkpoint", str(directory), "--prompt", "def ",
                   "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu")


def test_generate_cli_with_expert_store_mmap_gives_the_resident_text(tmp_path):
    model, base = saved_mixtral(tmp_path)
    rc, resident, err = _cli(*base)
    assert rc == 0, err
    budget = budget_for(model, model.config.router.top_k + 1, max_batch_size=1)
    assert _cli(*base, "--gpu-memory", budget, "--expert-store", "mmap") == (0, resident, "")
    rc, _, err = _cli(*base, "--expert-store", "mmap")
    assert rc == 2 and err == "moeflow: error: --expert-store needs --gpu-memory\n"
    rc, _, err = _cli(*base, "--gpu-memory", budget, "--expert-store", "mmap",
                      "--cpu-experts", "split")
    assert rc == 2 and err.count("\n") == 1 and "expert_store='mmap'" in err


def json_source() -> str:
    import json

    return json.__file__.replace("__init__.py", "decoder.py")


def test_experts_stored_in_another_dtype_are_converted_on_the_way_to_the_slot(tmp_path):
    """A bf16 checkpoint loaded without a dtype serves fp32 (the default dtype, as
    load_model gives every other parameter): the views stay bf16, the staged copy converts."""
    write_weights(tmp_path, make_model("pr_moe").to(torch.bfloat16))
    resident = load_model(tmp_path)
    mapped = load_model(tmp_path, map_experts=True)
    assert mapped.moe_layers()[0].experts.dtype == resident.tok_emb.weight.dtype == torch.float32
    ps = prompts(2, seed=11)
    budget = budget_for(resident, 2, max_batch_size=2)
    _, *want = run(resident, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget))
    engine, *got = run(mapped, ps, max_batch_size=2, offload=OffloadConfig(
        device="cpu", gpu_memory=budget, expert_store="mmap"))
    assert_equal_runs(got, want)
    assert engine.offload.cache.store.expert(0, 0)[0].dtype == torch.bfloat16
    assert engine.offload.cache.w_in_SDI.dtype == torch.float32
