"""Checkpoints damaged in ways a header still parses: a tensor of another shape or dtype, one
dropped, a file deleted, bytes garbled inside the data, `latest` lost, manifest.json deleted,
JSON that parses but says the wrong thing, a HF export cut short or with another model_type.

Each is refused in one line `moeflow: error: ...` naming the file (and the tensor or field), exit
status 2, by every command that reads it (generate, serve, convert, train --resume / --init),
and nothing on disk changes; none loads garbage (uninitialised memory where a tensor was
missing, a garbled weight) or starts a run over. A `latest` that is lost falls back to the newest
checkpoint with a one-line warning.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.cli import main
from moeflow.train import checkpoint as ckpt_io

from _train_small import FAST, snapshot, train_argv, write_config, write_corpus

STEP = "checkpoints/step_00000001"
WEIGHTS = f"{STEP}/model/shard-00001-model-00001-of-00001.safetensors"
TRAINER = f"{STEP}/trainer/shard-00001-model-00001-of-00001.safetensors"
MANIFEST = f"{STEP}/manifest.json"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A run stopped after one of its two steps (`--resume` has work to do), and its corpus."""
    root = tmp_path_factory.mktemp("damage")
    out, corpus = root / "run", write_corpus(root / "data")
    argv = train_argv(write_config(root / "micro.json"), corpus, out, "--steps", "2",
                      "--stop-at", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out, corpus


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def copy(made, tmp_path, old_format=False) -> Path:
    """A copy of the run; `old_format`: its manifest without the file list (as written before
    the list existed), so only the files' headers can be checked."""
    out = tmp_path / "run"
    shutil.copytree(made[0], out)
    if old_format:
        manifest = json.loads((out / MANIFEST).read_text())
        manifest.pop("files", None)
        (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def rewrite(path: Path, change) -> None:
    """Rewrite safetensors file `path` (its metadata kept) with `change(tensors)` applied."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def commands(run, tmp_path, corpus, resume=True):
    """Every command that loads the run's model: (argv, whether it got as far as loading)."""
    out = [("generate", "--checkpoint", run, "--prompt", "def ", "--max-new-tokens", "2"),
           ("serve", "--model", run, "--port", "0"),
           ("convert", run, tmp_path / "hf", "--to", "hf"),
           ("train", "--init", run, "--data", corpus, "--out", tmp_path / "init", *FAST,
            "--steps", "1")]
    return out + [("train", "--out", run, "--resume")] * resume


def refused(argv, *names) -> str:
    """Run `argv`: one line `moeflow: error: ...` naming every one of `names`, exit status 2."""
    rc, err = cli(*argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (argv, rc, err)
    assert lines[0].startswith("moeflow: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def refused_everywhere(run, tmp_path, corpus, *names, resume=True) -> None:
    before = snapshot(run)
    for argv in commands(run, tmp_path, corpus, resume):
        refused(argv, *names)
    assert snapshot(run) == before
    assert not (tmp_path / "hf").exists() and not (tmp_path / "init").exists()


# ---- 1. a tensor whose stored shape or dtype differs from the manifest ----------------------

@pytest.mark.parametrize("old_format", [False, True], ids=["listed", "old-format"])
def test_a_tensor_stored_in_another_shape_is_named_with_its_file(made, tmp_path, old_format):
    """It loaded as uninitialised rows (NaN) through every command, exit status 0."""
    run = copy(made, tmp_path, old_format)

    def shrink(t):
        t["tok_emb.weight"] = torch.zeros(10, t["tok_emb.weight"].shape[1])
    rewrite(run / WEIGHTS, shrink)
    line = refused(("generate", "--checkpoint", run, "--prompt", "a"), run / WEIGHTS,
                   "'tok_emb.weight'", "[10, 32]")
    assert "does not fit" in line
    refused_everywhere(run, tmp_path, made[1], run / WEIGHTS, "'tok_emb.weight'")


def test_a_tensor_stored_in_another_dtype_is_named(made, tmp_path):
    run = copy(made, tmp_path, old_format=True)
    rewrite(run / WEIGHTS, lambda t: t.update({"tok_emb.weight": t["tok_emb.weight"].half()}))
    refused(("generate", "--checkpoint", run, "--prompt", "a"), run / WEIGHTS,
            "'tok_emb.weight'", "float16")


# ---- 2. weights missing ---------------------------------------------------------------------

@pytest.mark.parametrize("old_format", [False, True], ids=["listed", "old-format"])
def test_a_deleted_weights_file_is_named(made, tmp_path, old_format):
    """A KeyError traceback from torch's checkpoint reader."""
    run = copy(made, tmp_path, old_format)
    (run / WEIGHTS).unlink()
    names = (run / STEP / "model", "'tok_emb.weight'") if old_format else (run / WEIGHTS,)
    refused_everywhere(run, tmp_path, made[1], *names)


@pytest.mark.parametrize("old_format", [False, True], ids=["listed", "old-format"])
def test_a_tensor_dropped_from_the_weights_is_named(made, tmp_path, old_format):
    run = copy(made, tmp_path, old_format)
    rewrite(run / WEIGHTS, lambda t: t.pop("blocks.0.attn.proj.bias"))
    refused_everywhere(run, tmp_path, made[1], run / STEP / "model",
                       "'blocks.0.attn.proj.bias'")


def test_a_file_the_manifest_does_not_list_is_refused(made, tmp_path):
    run = copy(made, tmp_path)
    extra = run / STEP / "model" / "shard-00002-model-00001-of-00001.safetensors"
    shutil.copy(run / WEIGHTS, extra)
    refused(("generate", "--checkpoint", run, "--prompt", "a"), extra, "manifest.json")


# ---- garbled bytes: the files' CRC32s ---------------------------------------------------------

def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x55
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_size_and_crc32s(made):
    import zlib

    ckpt = made[0] / STEP
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.safetensors"))
    assert sorted(listed) == on_disk and len(on_disk) == 2
    for name, entry in listed.items():
        data = (ckpt / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["block"] > 0
        blocks = [data[i:i + entry["block"]] for i in range(0, len(data), entry["block"])]
        assert entry["crc32"] == [f"{zlib.crc32(b):08x}" for b in blocks]


def test_garbled_weight_bytes_are_named_by_their_file(made, tmp_path):
    """Random bytes inside the data of a well-formed file loaded as weights (exit status 0)."""
    run = copy(made, tmp_path)
    flip(run / WEIGHTS)
    line = refused(("generate", "--checkpoint", run, "--prompt", "a"), run / WEIGHTS, "CRC32")
    assert "damaged" in line
    refused_everywhere(run, tmp_path, made[1], run / WEIGHTS, "CRC32")


def test_garbled_trainer_bytes_are_named_and_the_model_still_serves(made, tmp_path):
    run = copy(made, tmp_path)
    flip(run / TRAINER, 0.9)
    before = snapshot(run)
    refused(("train", "--out", run, "--resume"), run / TRAINER, "CRC32")
    assert snapshot(run) == before
    rc, err = cli("generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", "2")
    assert rc == 0, err


def test_a_checkpoint_without_the_file_list_still_loads_and_resumes(made, tmp_path):
    run = copy(made, tmp_path, old_format=True)
    rc, err = cli("generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", "2")
    assert rc == 0, err
    rc, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    # the new checkpoint lists its files again
    assert "files" in json.loads((run / "checkpoints/step_00000002/manifest.json").read_text())


# ---- 3. the trainer state missing ---------------------------------------------------------------

@pytest.mark.parametrize("old_format", [False, True], ids=["listed", "old-format"])
def test_a_deleted_trainer_file_is_named_and_nothing_restarts(made, tmp_path, old_format):
    """A KeyError 'rng.torch' traceback, after the optimizer state had silently stayed empty."""
    run = copy(made, tmp_path, old_format)
    (run / TRAINER).unlink()
    before = snapshot(run)
    refused(("train", "--out", run, "--resume"),
            *((run / STEP / "trainer", "'rng.torch'") if old_format else (run / TRAINER,)))
    assert snapshot(run) == before


# ---- 5. `latest` lost, manifest.json deleted ------------------------------------------------

@pytest.mark.parametrize("latest", [None, "", "step_00000099\n"], ids=["gone", "empty", "dangling"])
def test_a_lost_latest_falls_back_to_the_newest_checkpoint(made, tmp_path, latest):
    """It read as "holds no moeflow checkpoint", and --resume started the run over."""
    run = copy(made, tmp_path)
    pointer = run / "checkpoints" / "latest"
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_text(latest)
    rc, err = cli("generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", "2")
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("moeflow: warning: "), err
    assert str(pointer) in lines[0] and str(run / STEP) in lines[0]
    assert ckpt_io.latest_checkpoint(run) == run / STEP
    written = len((run / "metrics.jsonl").read_text().splitlines())
    rc, err = cli("train", "--out", run, "--resume")
    assert rc == 0, err
    new = [json.loads(line) for line in
           (run / "metrics.jsonl").read_text().splitlines()[written:]]
    assert new and {r["step"] for r in new} == {2}, new  # continued from step 1, not step 0
    assert pointer.read_text().strip() == "step_00000002"


@pytest.mark.parametrize("named", [True, False], ids=["by-latest", "newest"])
def test_a_checkpoint_without_its_manifest_is_named_and_nothing_restarts(made, tmp_path, named):
    run = copy(made, tmp_path)
    (run / MANIFEST).unlink()
    if not named:
        (run / "checkpoints" / "latest").unlink()
    before = snapshot(run)
    for argv in [("generate", "--checkpoint", run, "--prompt", "a"),
                 ("generate", "--checkpoint", run / STEP, "--prompt", "a"),
                 ("convert", run, tmp_path / "hf", "--to", "hf"),
                 ("train", "--out", run, "--resume")]:
        refused(argv, run / STEP, "manifest.json")
    assert snapshot(run) == before


# ---- 6. JSON that parses, or does not, in a checkpoint ---------------------------------------

def test_a_garbled_config_is_named_by_convert(made, tmp_path):
    run = copy(made, tmp_path)
    (run / STEP / "config.json").write_bytes(b"\x00\x01garbage")
    refused(("convert", run, tmp_path / "hf", "--to", "hf"), run / STEP / "config.json")


@pytest.mark.parametrize("change", [{"step": "x"}, {"tokens": -3}, {"loader": {}},
                                    {"python_rng": [3, "x", None]}],
                         ids=["step", "tokens", "loader", "python_rng"])
def test_state_entries_of_the_wrong_type_are_named(made, tmp_path, change):
    """"step": "x" was "invalid literal for int() with base 10: 'x'"."""
    run = copy(made, tmp_path)
    path = run / STEP / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    before = snapshot(run)
    refused(("train", "--out", run, "--resume"), path, repr(next(iter(change))))
    assert snapshot(run) == before


# ---- 4. a damaged HF export ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(made, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    rc, err = cli("convert", made[0], out, "--to", "hf")
    assert rc == 0, err
    return out


def hf_commands(src, tmp_path, corpus):
    return [("generate", "--checkpoint", src, "--prompt", "def ", "--max-new-tokens", "2"),
            ("serve", "--model", src, "--port", "0"),
            ("convert", src, tmp_path / "mf", "--to", "moeflow"),
            ("train", "--init", src, "--data", corpus, "--out", tmp_path / "init", *FAST,
             "--steps", "1")]


@pytest.mark.parametrize("damage", ["truncated", "mixtral", "garbled-config", "no-moeflow"])
def test_a_damaged_hf_export_is_named(made, hf_dir, tmp_path, damage):
    """A SafetensorError or KeyError 'intermediate_size' traceback; a bare JSON message."""
    src = tmp_path / "export"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    if damage == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:len(data) // 2])
        names = (src / "model.safetensors", "damaged or truncated")
    elif damage == "mixtral":
        (src / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
        names = (src / "config.json", "'intermediate_size'", "'mixtral'")
    elif damage == "garbled-config":
        (src / "config.json").write_text("{not json")
        names = (src / "config.json", "damaged")
    else:
        (src / "config.json").write_text(json.dumps({**config, "moeflow": "gpt"}))
        names = (src / "config.json", "moeflow.arch")
    before = snapshot(src)
    for argv in hf_commands(src, tmp_path, made[1]):
        refused(argv, *names)
    assert snapshot(src) == before


def test_a_shard_verifies_the_blocks_it_reads(tmp_path, monkeypatch):
    """An expert-parallel rank checks the CRC32 of the blocks holding its experts, not the
    others' (a byte garbled in expert 7 stops rank 1 of EP=2 and a whole load, not rank 0)."""
    from _train_small import MICRO

    from moeflow.checkpoint import CheckpointError, integrity, load_weights, write_weights
    from moeflow.checkpoint.storage import stored_pieces
    from moeflow.config import ModelConfig
    from moeflow.model import Transformer
    from moeflow.parallel import ParallelConfig, ParallelLayout
    from moeflow.parallel.shard import moe_layer_experts, shard_experts

    monkeypatch.setattr(integrity, "BLOCK", 4096)  # an expert's rows span several blocks
    config = ModelConfig.from_dict(MICRO)
    torch.manual_seed(0)
    write_weights(tmp_path, Transformer(config))
    piece, = stored_pieces(tmp_path / "model")["blocks.3.ffn.experts.w_in_EDI"]
    assert piece.shape[0] == 8
    begin, end = piece.span
    flip(piece.file, (begin + (end - begin) * 15 / 16) / piece.file.stat().st_size)

    def shard(rank):
        model = Transformer(config)
        layout = ParallelLayout.build(ParallelConfig(ep=2), 2, rank, moe_layer_experts(model))
        for lay in layout.layers:
            layer = model.blocks[lay.layer].ffn
            layer.experts = shard_experts(layer.experts, lay)
        return model

    load_weights(shard(0), tmp_path)
    for model in (shard(1), Transformer(config)):
        with pytest.raises(CheckpointError, match=f"{piece.file}: .*CRC32|{piece.file} is "
                                                  f"damaged: its bytes"):
            load_weights(model, tmp_path)


def test_from_pretrained_reads_a_run_directory_and_names_a_file_given_for_one(made, tmp_path):
    """The README lists from_pretrained among the readers of a run: it took only a checkpoint
    directory ("no model.safetensors"); a path to a file said "does not exist"."""
    import moeflow

    run = made[0]
    model = moeflow.from_pretrained(run)
    want, _ = ckpt_io.load_for_inference(run)
    for (name, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    refused(("generate", "--checkpoint", run / "run.json", "--prompt", "x"),
            "is a file, not a model directory")
