"""Prepared datasets: `moeflow prepare-data` writes tokens once; `train --data DIR` reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeflow.data.corpus import interpreter_documents, load_corpus, split_documents
from moeflow.data.prepared import DataSpec, load_prepared, prepare_dataset

from _train_small import cli_in_process, losses, write_config, write_corpus


def test_prepare_then_train_reads_the_prepared_tokens(tmp_path):
    # the commands run in this process (tests/_train_small.cli_in_process): what they write,
    # print and return is the point, not the interpreter
    corpus = write_corpus(tmp_path / "text")
    data = tmp_path / "prepared"
    r = cli_in_process("prepare-data", "--out", str(data), "--data", str(corpus),
                    "--vocab-size", "320", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    info = json.loads((data / "dataset.json").read_text())
    prepared = load_prepared(data)
    assert info["train_tokens"] == len(prepared.train_tokens) > 0
    assert info["val_tokens"] == len(prepared.val_tokens) > 0
    assert prepared.tokenizer.vocab_size <= 320
    # Every document ends with end-of-text, and decoding the stream gives the text back.
    eot = prepared.tokenizer.eot_id
    assert int(np.sum(prepared.val_tokens == eot)) == info["val_documents"]
    first = prepared.val_tokens[:list(prepared.val_tokens).index(eot)]
    assert prepared.tokenizer.decode(first.tolist()).strip()

    config = write_config(tmp_path / "micro.json")
    out = tmp_path / "run"
    r = cli_in_process("train", "--config", str(config), "--data", str(data), "--out", str(out),
                    "--steps", "2", "--batch-size", "4", "--val-every", "2", "--val-batches", "1",
                    "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [s for s, *_ in losses(out)] == [0, 1, 2]
    saved = (out / "checkpoints").glob("step_*/tokenizer.json")
    assert next(saved).read_text() == (data / "tokenizer.json").read_text()

    again = cli_in_process("prepare-data", "--out", str(data), "--data", str(corpus))
    assert again.returncode == 2 and "already exists" in again.stderr
    mixed = cli_in_process("train", "--config", str(config), "--data", str(data), str(corpus),
                           "--out", str(tmp_path / "mixed"), "--steps", "2", "--no-progress")
    assert mixed.returncode == 2 and "is a prepared dataset, which trains alone" in mixed.stderr

    # A token file whose ids the tokenizer does not have (damaged, or from another dataset):
    # one line naming the file, nothing written (it was an IndexError inside the embedding).
    tokens = np.fromfile(data / "val.tokens", dtype=np.dtype(info["dtype"]))
    tokens[3] = prepared.tokenizer.vocab_size + 7
    tokens.tofile(data / "val.tokens")
    r = cli_in_process("train", "--config", str(config), "--data", str(data), "--out",
                       str(tmp_path / "bad"), "--steps", "2", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"val.tokens: token id {prepared.tokenizer.vocab_size + 7} is outside" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_interpreter_corpus_is_deduplicated_and_sampled_across_the_split(tmp_path):
    docs, stats = interpreter_documents(max_bytes=1 << 20)
    assert stats["bytes"] >= 1 << 20 and len({d.text for d in docs}) == len(docs)
    assert all(d.name.startswith(("stdlib/", "site")) for d in docs)
    train, val = split_documents(docs, 0.1)
    assert len(train) > 5 * len(val) > 0  # the sample order does not follow the split


def test_the_split_does_not_depend_on_where_the_data_sits(tmp_path):
    """Documents are named relative to the --data argument: a corpus copied elsewhere splits
    into the same training and validation documents (with absolute names it did not, which
    made a test's batches depend on pytest's temporary directory)."""
    splits = []
    for where in ("a", "b/deeper"):
        root = tmp_path / where / "corpus"
        (root / "sub").mkdir(parents=True)
        for i in range(30):
            (root / "sub" / f"f{i}.txt").write_text(f"text number {i}\n")
        (root / "r.jsonl").write_text("".join(json.dumps({"text": f"record {i}"}) + "\n"
                                              for i in range(30)))
        docs = load_corpus([str(root), str(root / "r.jsonl")])
        train, val = split_documents(docs, 0.2)
        splits.append(([d.name for d in train], [d.name for d in val]))
    assert splits[0] == splits[1]
    assert "sub/f0.txt" in splits[0][0] + splits[0][1] and "r.jsonl:1" in sum(splits[0], [])
    assert splits[0][1]  # some documents went to validation


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        DataSpec(val_fraction=1.5)
    with pytest.raises(ValueError, match="max_bytes applies"):
        DataSpec(source=("some/dir",), max_bytes=10)
    with pytest.raises(ValueError, match="max_bytes=0"):  # was "min() arg is an empty sequence"
        DataSpec(max_bytes=0)
    with pytest.raises(ValueError, match="already exists"):
        prepare_dataset(DataSpec(), ".")
