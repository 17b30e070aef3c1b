"""`moeflow train` with expert groups: group ids from a JSONL field or the modality rule travel
with the tokens into the model, per-group statistics reach metrics.jsonl, resumption is exact,
and every missing or wrong group source is a one-line error."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from moeflow.cli import main
from moeflow.data.loader import BatchLoader, micro_batches
from moeflow.train import TrainConfig, Trainer
from moeflow.train.plots import plot_run

from _train_small import FAST, losses

GROUPED = {
    "name": "grouped", "arch": "gpt", "vocab_size": 320, "n_layers": 2, "d_model": 32,
    "n_heads": 2, "max_seq_len": 32, "moe_every": 2, "num_experts": 4,
    # capacity 0.5: some assignments are dropped, so the per-group dropped fraction is not 0
    "router": {"top_k": 1, "capacity_factor": 0.5, "min_capacity": 1,
               "expert_groups": [["code", 2], ["text", 2]]},
}
CODE = ["def f{i}(x):\n    return x * {i} + len(str(x))\n",
        "for k in range({i}):\n    total = total + k ** 2\n"]
PROSE = ["The river {i} runs past the old mill and into the sea at dawn.",
         "Readers of chapter {i} learn how the garden grew under the summer rain."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("groups")
    cfg = d / "grouped.json"
    cfg.write_text(json.dumps(GROUPED))
    plain = d / "plain.json"
    plain.write_text(json.dumps({**GROUPED, "router": {"top_k": 1}}))
    records = []
    for i in range(40):
        kind = "code" if i % 3 == 0 else "text"  # a third code, two thirds text
        text = (CODE if kind == "code" else PROSE)[i % 2].format(i=i)
        records.append({"text": text * 3, "modality": kind})
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    src = d / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(f'"""Module {i}: helpers for the tests."""\n\n' +
                                      CODE[i % 2].format(i=i) * 4 + "# done here\n")
        (src / f"n{i}.md").write_text(PROSE[i % 2].format(i=i) * 4)
    return {"config": cfg, "plain": plain, "jsonl": jsonl, "src": src, "dir": d}


def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def argv(files, data, out, *extra, config="config"):
    return ["train", "--config", str(files[config]), "--data", str(data), "--out", str(out),
            *FAST, *extra]


def test_jsonl_field_groups_reach_the_model_window_by_window(files, tmp_path):
    """A step's per-group assignment counts equal the group ids of the step's input tokens
    (the loader's same windows, micro-batches cut the same way), so the ids are aligned with
    the tokens and passed into the model."""
    cfg = TrainConfig(model_config=str(files["config"]), data=(str(files["jsonl"]),),
                      group_field="modality", out=str(tmp_path / "run"), batch_size=4,
                      micro_batch=2, steps=2, progress=False)
    trainer = Trainer(cfg)
    trainer.prepare()
    replay = BatchLoader(trainer.train_data, cfg.batch_size, cfg.seed)
    batch, groups = replay.next_windows()
    assert groups is not None and groups.shape == batch.shape
    expect = torch.zeros(2, dtype=torch.int64)
    for g in micro_batches(groups, 0, 1, 2):
        expect += torch.bincount(g[:, :-1].flatten(), minlength=2)
    row = trainer.train_step(1)
    got = row["group_assignments"]
    assert [got["code"], got["text"]] == expect.tolist()  # one MoE layer, top-1
    assert expect.min() > 0  # both groups in the batch: the comparison above can fail
    assert 0 < row["group_dropped_frac"]["text"] < 1


def test_train_resume_and_plot_with_the_modality_rule(files, tmp_path):
    """--group-rule on .py and .md files: a run interrupted and resumed writes the losses of an
    uninterrupted one; metrics and the plot carry the groups."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    rule = ("--group-rule", "modality")
    assert cli(argv(files, files["src"], straight, *rule, "--steps", "4")) == (0, "")
    assert cli(argv(files, files["src"], split, *rule, "--steps", "4", "--stop-at", "2"))[0] == 0
    assert cli(argv(files, files["src"], split, "--steps", "4", "--resume"))[0] == 0
    assert losses(split) == losses(straight)
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert all(set(r["group_assignments"]) == {"code", "text"} for r in train_rows)
    # both groups over the run, not in every step: one step's 4 windows may hold one group
    # only. (A full-suite run once had a step without code tokens: the split then depended on
    # the absolute paths of pytest's temporary directory; documents are now named relative
    # to the --data argument, tests/test_prepared.py.)
    assert sum(r["group_assignments"]["code"] for r in train_rows) > 0
    assert sum(r["group_assignments"]["text"] for r in train_rows) > 0
    assert rows[-1]["expert_groups"] == [["code", 2], ["text", 2]]
    names = [p.name for p in plot_run(straight)]
    assert "expert_groups.png" in names


def test_group_sources_are_checked_with_one_line_errors(files, tmp_path):
    d = files["dir"]
    bad_value = d / "bad_value.jsonl"
    bad_value.write_text(json.dumps({"text": "x = 1", "modality": "code"}) + "\n" +
                         json.dumps({"text": "a picture", "modality": "image"}) + "\n")
    missing = d / "missing.jsonl"
    missing.write_text(json.dumps({"text": "x = 1", "modality": "code"}) + "\n\n" +
                       json.dumps({"text": "no label"}) + "\n")
    cases = [
        (argv(files, bad_value, tmp_path / "o", "--group-field", "modality"),
         "bad_value.jsonl:2: modality 'image' is not one of the model's expert groups "
         "(code, text)"),
        (argv(files, missing, tmp_path / "o", "--group-field", "modality"),
         f"{missing} line 3: no field 'modality'"),
        (argv(files, files["jsonl"], tmp_path / "o"),
         "the model has expert groups (code, text): give every token a group"),
        (argv(files, files["jsonl"], tmp_path / "o", "--group-field", "modality",
              config="plain"), "--group-field: the model has no expert groups"),
        (argv(files, files["src"], tmp_path / "o", "--group-field", "modality"),
         "is not a JSONL file: --group-field 'modality' needs"),
        (argv(files, files["jsonl"], tmp_path / "o", "--group-field", "modality",
              "--group-rule", "modality"), "give one of them"),
    ]
    for args, message in cases:
        rc, err = cli(args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("moeflow: error: "), err
        assert message in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
    other = d / "other.json"
    other.write_text(json.dumps({**GROUPED, "router": {
        "top_k": 1, "expert_groups": [["code", 2], ["prose", 2]]}}))
    rc, err = cli(["train", "--config", str(other), "--data", str(files["src"]), "--out",
                   str(tmp_path / "o"), "--group-rule", "modality", *FAST])
    assert rc == 2 and "have no 'text'" in err, err


def test_prepared_dataset_carries_group_labels_by_name(files, tmp_path):
    """prepare-data --group-field stores labels by name; a model naming its groups in the other
    order gets them mapped by name (text-group tokens = the text records' tokens), trains, and
    an unlabelled dataset or a foreign group name is a one-line error."""
    from moeflow.data.corpus import load_corpus, split_documents
    from moeflow.data.prepared import load_prepared

    data = tmp_path / "prep"
    assert cli(["prepare-data", "--out", str(data), "--data", str(files["jsonl"]),
                "--vocab-size", "300", "--val-fraction", "0.2", "--group-field", "modality"]) \
        == (0, "")
    prepared = load_prepared(data)
    assert prepared.info.group_names == ("code", "text")
    reversed_cfg = tmp_path / "reversed.json"
    reversed_cfg.write_text(json.dumps({**GROUPED, "router": {
        **GROUPED["router"], "expert_groups": [["text", 2], ["code", 2]]}}))
    cfg = TrainConfig(model_config=str(reversed_cfg), data=(str(data),), out=str(tmp_path / "r"),
                      batch_size=4, steps=1, progress=False)
    trainer = Trainer(cfg)
    trainer.prepare()
    train_docs, _ = split_documents(load_corpus([str(files["jsonl"])], "text", "modality"), 0.2)
    text_tokens = sum(len(prepared.tokenizer.encode(d.text)) for d in train_docs
                      if d.group == "text")
    assert int((trainer.train_data.groups == 0).sum()) == text_tokens  # "text" is group 0 here
    assert trainer.train_step(1)["group_assignments"]["text"] > 0

    plain = tmp_path / "plain_prep"
    assert cli(["prepare-data", "--out", str(plain), "--data", str(files["jsonl"]),
                "--vocab-size", "300"])[0] == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**GROUPED, "router": {
        "top_k": 1, "expert_groups": [["code", 2], ["prose", 2]]}}))
    for args, message in [
            (["--data", str(plain)], "holds no expert group labels"),
            (["--data", str(data), "--group-rule", "modality"],
             "a prepared dataset brings its own group labels"),
            (["--data", str(data), "--config", str(other)], "have no 'text'")]:
        config = [] if "--config" in args else ["--config", str(files["config"])]
        rc, err = cli(["train", *config, *args, "--out", str(tmp_path / "o"), *FAST])
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
