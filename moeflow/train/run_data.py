"""A training run's data: the token windows it trains and validates on, and their tokenizer.

Text (files, directories, JSONL, a built-in corpus) is split into training and validation
documents and tokenized with the run's BPE tokenizer: trained here on the training split, or the
resumed checkpoint's, or the one a teacher or an --init checkpoint brings. A prepared dataset
directory (moeflow.data.prepared) brings its own tokens and tokenizer, which a teacher and a
resumed checkpoint must share.

Expert groups: a model whose router names expert_groups trains on tokens that each carry a group
id, from a JSONL field (`group_field`) or a rule (`group_rule`), see moeflow.data.groups;
`check_group_source` refuses a grouped model without a source (see moeflow.train.trainer for
why there is no default group) and a source for an ungrouped one. A prepared dataset's labels
are stored by name and mapped to the model's groups here.

Everything here checks its input before returning and writes nothing (Trainer.prepare's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.config import ModelConfig
from moeflow.data.corpus import load_corpus, split_documents
from moeflow.data.groups import document_group_ids, encode_grouped, rule_group_ids
from moeflow.data.loader import PackedTokens
from moeflow.data.prepared import PreparedDataset, is_prepared, load_prepared
from moeflow.data.tokenizer import BPETokenizer
from moeflow.train import checkpoint as ckpt_io
from moeflow.train.run_config import TrainConfig


@dataclass(frozen=True)
class RunData:
    tokenizer: BPETokenizer
    train: PackedTokens
    val: PackedTokens


def is_prepared_run(cfg: TrainConfig) -> bool:
    """Whether the run's data is one prepared dataset directory (refused beside other data:
    its tokens come with their own tokenizer)."""
    prepared = [d for d in cfg.data if is_prepared(d)]
    if prepared and len(cfg.data) > 1:
        raise ValueError(f"--data: {prepared[0]!r} is a prepared dataset, which trains alone "
                         f"(its tokens have their own tokenizer); prepare the other data with "
                         f"it (moeflow prepare-data --data ...) or train on text only")
    return bool(prepared)


def check_group_source(cfg: TrainConfig, model_config: ModelConfig, prepared: bool) -> None:
    """A grouped model needs a source of group ids and an ungrouped one takes none; a prepared
    dataset is its own."""
    names = model_config.router.group_names
    flag = "--group-field" if cfg.group_field is not None else "--group-rule"
    if names and cfg.pregate:
        raise ValueError("--pregate: the model has expert groups; pre-gate heads for grouped "
                         "routing are not built yet")
    if prepared and (cfg.group_field is not None or cfg.group_rule is not None):
        raise ValueError(f"{flag}: a prepared dataset brings its own group labels (give the "
                         f"flag to `moeflow prepare-data` instead)")
    if prepared:
        return
    if names and cfg.group_field is None and cfg.group_rule is None:
        raise ValueError(f"the model has expert groups ({', '.join(names)}): give every token "
                         f"a group with --group-field FIELD (JSONL records naming their group) "
                         f"or --group-rule modality")
    if not names and (cfg.group_field is not None or cfg.group_rule is not None):
        raise ValueError(f"{flag}: the model has no expert groups (router.expert_groups)")


def load_run_data(cfg: TrainConfig, model_config: ModelConfig, seq_len: int,
                  resume_ckpt: Path | None, source_tokenizer: BPETokenizer | None) -> RunData:
    """The run's windows of seq_len tokens and its tokenizer. `source_tokenizer`: the teacher's
    or the --init checkpoint's (None: train one, or take the resumed checkpoint's)."""
    if is_prepared_run(cfg):
        return _from_prepared(cfg, model_config, seq_len, load_prepared(cfg.data[0]),
                              resume_ckpt, source_tokenizer)
    return _from_text(cfg, model_config, seq_len, resume_ckpt, source_tokenizer)


def _from_text(cfg: TrainConfig, model_config: ModelConfig, seq_len: int,
               resume_ckpt: Path | None, source_tokenizer: BPETokenizer | None) -> RunData:
    """Train data from text: the run's tokenizer (trained here, or the checkpoint's or the
    teacher's) encodes the corpus's training and validation documents."""
    docs = load_corpus(cfg.data, cfg.text_field, cfg.group_field)
    names = model_config.router.group_names
    if cfg.group_field is not None:  # every label checked before any tokenizer training
        document_group_ids(docs, names, cfg.group_field)
    elif cfg.group_rule is not None:
        rule_group_ids(cfg.group_rule, names)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if resume_ckpt is not None:
        tokenizer = ckpt_io.load_tokenizer(resume_ckpt)
    elif source_tokenizer is not None:
        tokenizer = source_tokenizer
    else:
        tokenizer = BPETokenizer.train((d.text for d in train_docs), model_config.vocab_size)
    _check_vocab(tokenizer, model_config)
    splits = []
    for split, split_docs in (("train", train_docs), ("validation", val_docs)):
        groups = None
        if names:
            tokens, groups = encode_grouped(tokenizer, split_docs, names,
                                            field=cfg.group_field, rule=cfg.group_rule)
        else:
            tokens = tokenizer.encode_documents([d.text for d in split_docs])
        splits.append(PackedTokens(tokens, seq_len, split, groups=groups))
    return RunData(tokenizer, *splits)


def _from_prepared(cfg: TrainConfig, model_config: ModelConfig, seq_len: int,
                   data: PreparedDataset, resume_ckpt: Path | None,
                   source_tokenizer: BPETokenizer | None) -> RunData:
    """Train data from a prepared dataset: its tokens, its tokenizer (which a teacher and a
    resumed checkpoint must share)."""
    train_groups, val_groups = _prepared_groups(data, model_config)
    checkpoint_tokenizer = resume_ckpt and ckpt_io.load_tokenizer(resume_ckpt)
    source = "the teacher" if cfg.distilling else "the --init checkpoint"
    for owner, other in ((source, source_tokenizer), ("the checkpoint", checkpoint_tokenizer)):
        if other is not None and other.to_str() != data.tokenizer.to_str():
            raise ValueError(f"{owner}'s tokenizer differs from the prepared dataset "
                             f"{str(data.path)!r}'s")
    _check_vocab(data.tokenizer, model_config)
    return RunData(data.tokenizer,
                   PackedTokens(data.train_tokens, seq_len, "train", data.info.digest,
                                train_groups),
                   PackedTokens(data.val_tokens, seq_len, "validation", data.info.digest,
                                val_groups))


def _prepared_groups(data: PreparedDataset, model_config: ModelConfig) -> tuple[Any, Any]:
    """The prepared dataset's labels as the model's group ids (None, None: no groups)."""
    names = model_config.router.group_names
    if not names:
        return None, None
    have = data.info.group_names
    if not have:
        raise ValueError(f"the prepared dataset {str(data.path)!r} holds no expert group "
                         f"labels; prepare it with --group-field or --group-rule")
    missing = [n for n in have if n not in names]
    if missing:
        raise ValueError(f"the prepared dataset {str(data.path)!r} labels tokens "
                         f"{', '.join(have)}; the model's expert groups "
                         f"({', '.join(names)}) have no {missing[0]!r}")
    lut = np.asarray([names.index(n) for n in have], dtype=np.uint8)
    return lut[data.train_groups], lut[data.val_groups]


def _check_vocab(tokenizer: BPETokenizer, model_config: ModelConfig) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_config.vocab_size}")
