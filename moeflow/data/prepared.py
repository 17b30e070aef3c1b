"""Prepared datasets: a corpus tokenized once, cached on disk, read by any number of runs.

    moeflow prepare-data --out data/interp --data builtin:interpreter --vocab-size 8192
    moeflow train --data data/interp --preset tiny ...

A prepared dataset is a directory:
  dataset.json    what it holds (PreparedInfo): where the text came from, documents, duplicates
                  dropped, bytes, documents and tokens per split, vocabulary, a digest of the tokens
  tokenizer.json  the byte-level BPE tokenizer, trained on a sample of the training split
  train.tokens    the training split's token ids, each document ended by end-of-text
  val.tokens      the validation split's (the split is by document: corpus.split_documents)
  train.groups    with group_field / group_rule (expert groups, moeflow.data.groups): each
  val.groups      token's group label, uint8, an index into dataset.json's group_names
Token files are raw little-endian uint16 (vocabularies up to 65536) or uint32.

Group labels are stored by name (group_names: the rule's labels, or the field's distinct values
in sorted order), not as a model's group ids, so one prepared dataset serves any model whose
expert groups include those names, in any order; the trainer maps them.

Why: tokenizing hundreds of MB takes minutes, and a reproduction trains eight models on the same
tokens. The tokenizer trains on a sample of `tokenizer_sample_bytes` of training text (documents
in a fixed pseudo-random order), because the BPE trainer's time grows with its input while the
merges it finds settle after tens of MB. Documents are encoded in chunks, so memory stays bounded
by the token arrays, not by the tokenizer's per-document objects.

The directory is built in a temporary sibling and renamed into place, so an interrupted
preparation leaves nothing that looks prepared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.data.corpus import Document, interpreter_documents, load_corpus, split_documents
from moeflow.data.groups import GROUP_RULES
from moeflow.data.modality import MODALITIES, encode_labelled
from moeflow.data.tokenizer import BPETokenizer
from moeflow.validate import integer, number

FORMAT = 1
INFO = "dataset.json"
TOKENIZER = "tokenizer.json"
_ENCODE_CHUNK = 512  # documents per encode_batch call


@dataclass(frozen=True)
class DataSpec:
    """What to prepare: the text (corpus names as for `--data`), the vocabulary, the split."""

    source: tuple[str, ...] = ("builtin:interpreter",)
    vocab_size: int = 8192
    val_fraction: float = 0.02
    max_bytes: int | None = None  # builtin:interpreter only: stop reading after this many bytes
    tokenizer_sample_bytes: int = 64 << 20
    text_field: str = "text"
    group_field: str | None = None  # expert groups: the JSONL field naming each record's group
    group_rule: str | None = None  # or a rule labelling every token (moeflow.data.groups)

    def __post_init__(self) -> None:
        if isinstance(self.source, (list, str)):
            object.__setattr__(self, "source", tuple([self.source] if isinstance(self.source, str)
                                                     else self.source))
        number("val_fraction", self.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        for name in ("vocab_size", "tokenizer_sample_bytes"):
            integer(name, getattr(self, name), lo=1)
        integer("max_bytes", self.max_bytes, lo=1, optional=True)
        if self.max_bytes is not None and self.source != ("builtin:interpreter",):
            raise ValueError("max_bytes applies to the builtin:interpreter corpus only")
        if self.group_rule is not None and self.group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule={self.group_rule!r}: choose one of "
                             f"{', '.join(GROUP_RULES)}")
        if self.group_field is not None and self.group_rule is not None:
            raise ValueError("group_field and group_rule both label expert groups; give one")


@dataclass(frozen=True)
class PreparedInfo:
    spec: DataSpec
    documents: int  # kept, after deduplication
    duplicates: int  # files dropped as byte-identical copies of a kept one
    skipped: int  # files over 1 MB or not UTF-8
    bytes: int  # UTF-8 bytes of the kept documents
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    dtype: str  # of the token files
    digest: str  # sha256 over both token files and the tokenizer
    seconds: float  # to prepare
    format: int = FORMAT
    group_names: tuple[str, ...] = ()  # labels of the .groups files (empty: no group labels)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"]["source"] = list(self.spec.source)
        d["group_names"] = list(self.group_names)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PreparedInfo":
        if data.get("format") != FORMAT:
            raise ValueError(f"prepared dataset format {data.get('format')!r}; this moeflow "
                             f"reads format {FORMAT}")
        return cls(**{**data, "spec": DataSpec(**data["spec"]),
                      "group_names": tuple(data.get("group_names", ()))})


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    info: PreparedInfo
    tokenizer: BPETokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    train_groups: np.ndarray | None = None  # labels, indices into info.group_names
    val_groups: np.ndarray | None = None


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def _documents(spec: DataSpec) -> tuple[list[Document], dict]:
    if spec.source == ("builtin:interpreter",) and spec.group_field is None:
        return interpreter_documents(spec.max_bytes)
    docs = load_corpus(spec.source, spec.text_field, spec.group_field)
    return docs, {"duplicates": 0, "skipped": 0, "bytes": sum(len(d.text.encode()) for d in docs)}


def _tokenizer_sample(docs: list[Document], max_bytes: int):
    """Training documents in a fixed pseudo-random order until `max_bytes` of text."""
    total = 0
    for doc in sorted(docs, key=lambda d: zlib.crc32(("tokenizer:" + d.name).encode("utf-8"))):
        if total >= max_bytes:
            return
        total += len(doc.text)
        yield doc.text


def _write_tokens(path: Path, tokenizer: BPETokenizer, docs: list[Document], dtype,
                  digest, spec: DataSpec, group_names: tuple[str, ...]) -> int:
    """Write the token file (and, with group labels, the .groups file beside it)."""
    count = 0
    groups = open(path.with_suffix(".groups"), "wb") if group_names else None
    try:
        with open(path, "wb") as f:
            for i in range(0, len(docs), _ENCODE_CHUNK):
                part = docs[i:i + _ENCODE_CHUNK]
                if groups is None:
                    chunk = tokenizer.encode_documents([d.text for d in part])
                else:
                    whole = (None if spec.group_field is None
                             else [group_names.index(d.group) for d in part])
                    chunk, labels = encode_labelled(tokenizer, [d.name for d in part],
                                                    [d.text for d in part], whole)
                    digest.update(labels.tobytes())
                    groups.write(labels.tobytes())
                data = chunk.astype(dtype).tobytes()
                digest.update(data)
                f.write(data)
                count += len(chunk)
    finally:
        if groups is not None:
            groups.close()
    return count


def _group_names(spec: DataSpec, docs: list[Document]) -> tuple[str, ...]:
    if spec.group_rule is not None:
        return MODALITIES
    if spec.group_field is not None:
        return tuple(sorted({d.group for d in docs}))
    return ()


def prepare_dataset(spec: DataSpec, out: str | Path, log=print) -> PreparedInfo:
    """Tokenize `spec`'s corpus into `out` (which must not exist yet); returns what it wrote."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{str(out)!r} already exists")
    start = time.perf_counter()
    docs, stats = _documents(spec)
    train, val = split_documents(docs, spec.val_fraction)
    log(f"corpus: {len(docs):,} documents, {stats['bytes'] / 1e6:,.1f} MB "
        f"({stats['duplicates']:,} duplicates, {stats['skipped']:,} skipped files)")
    tokenizer = BPETokenizer.train(_tokenizer_sample(train, spec.tokenizer_sample_bytes),
                                   spec.vocab_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest = hashlib.sha256()
        names = _group_names(spec, docs)
        n_train = _write_tokens(tmp / "train.tokens", tokenizer, train, dtype, digest, spec, names)
        n_val = _write_tokens(tmp / "val.tokens", tokenizer, val, dtype, digest, spec, names)
        tokenizer.save(tmp / TOKENIZER)
        digest.update(tokenizer.to_str().encode())
        info = PreparedInfo(spec=spec, documents=len(docs), duplicates=stats["duplicates"],
                            skipped=stats["skipped"], bytes=stats["bytes"],
                            train_documents=len(train), val_documents=len(val),
                            train_tokens=n_train, val_tokens=n_val,
                            dtype=np.dtype(dtype).name, digest=digest.hexdigest(),
                            seconds=round(time.perf_counter() - start, 2), group_names=names)
        (tmp / INFO).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"tokens: {n_train:,} train, {n_val:,} validation (vocabulary {tokenizer.vocab_size}) "
        f"in {info.seconds:.0f}s")
    return info


def read_info(path: str | Path) -> PreparedInfo:
    """What a prepared dataset holds, from its dataset.json alone."""
    info_path = Path(path) / INFO
    try:
        return PreparedInfo.from_dict(json.loads(info_path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{info_path}: not a readable prepared dataset ({e})") from None


def load_prepared(path: str | Path) -> PreparedDataset:
    path = Path(path)
    info = read_info(path)
    tokenizer = BPETokenizer.load(path / TOKENIZER)
    splits, groups = [], []
    for name, expected in (("train.tokens", info.train_tokens), ("val.tokens", info.val_tokens)):
        tokens = np.fromfile(path / name, dtype=np.dtype(info.dtype))
        if len(tokens) != expected:
            raise ValueError(f"{path / name}: {len(tokens)} tokens, dataset.json says {expected}")
        if len(tokens) and int(tokens.max()) >= tokenizer.vocab_size:
            raise ValueError(f"{path / name}: token id {int(tokens.max())} is outside the "
                             f"dataset's vocabulary of {tokenizer.vocab_size} (damaged file?)")
        splits.append(tokens)
        if info.group_names:
            labels = np.fromfile((path / name).with_suffix(".groups"), dtype=np.uint8)
            if len(labels) != expected:
                raise ValueError(f"{(path / name).with_suffix('.groups')}: {len(labels)} group "
                                 f"labels for {expected} tokens")
            if len(labels) and int(labels.max()) >= len(info.group_names):
                raise ValueError(f"{(path / name).with_suffix('.groups')}: group label "
                                 f"{int(labels.max())} but the dataset names "
                                 f"{len(info.group_names)} groups")
            groups.append(labels)
    return PreparedDataset(path, info, tokenizer, splits[0], splits[1],
                           *(groups if groups else (None, None)))
