"""Training data for a model with expert groups: every token's group id, beside its token id.

    moeflow train --config grouped.json --data docs.jsonl --group-field modality
    moeflow train --config grouped.json --data builtin:interpreter --group-rule modality

Two sources, one per run (TrainConfig.group_field / group_rule):
* a JSONL field (`--group-field F`): each record names its document's group in field F; the
  names must be the model's group names (router.expert_groups), and the whole document is in
  that group. A value that is not a group name is a one-line error naming the record
  (`path:line`), the value and the known groups.
* a rule (`--group-rule modality`): moeflow.data.modality labels every token `code` or `text`
  (Python's tokenizer on .py documents, text elsewhere); the model must have groups with those
  names, in any order: labels are mapped to the model's groups by name, not by position.

End-of-text takes group id 0 (the model's first group): it belongs to no document (the
labeller's rule, kept for field labels too, so one token id never needs two groups).

The ids come back as a uint8 array as long as the token array, so the loader cuts both into
the same windows (moeflow.data.loader.PackedTokens).
"""

from __future__ import annotations

import numpy as np

from moeflow.data.corpus import Document
from moeflow.data.modality import MODALITIES, encode_labelled
from moeflow.data.tokenizer import BPETokenizer

GROUP_RULES = ("modality",)


def rule_group_ids(rule: str, group_names: tuple[str, ...]) -> np.ndarray:
    """lut: the model's group id of each label the rule produces (MODALITIES order)."""
    if rule not in GROUP_RULES:
        raise ValueError(f"group_rule={rule!r}: choose one of {', '.join(GROUP_RULES)}")
    missing = [m for m in MODALITIES if m not in group_names]
    if missing:
        raise ValueError(f"group_rule={rule!r} labels tokens {' or '.join(MODALITIES)}, but the "
                         f"model's expert groups ({', '.join(group_names)}) have no "
                         f"{' and no '.join(repr(m) for m in missing)}")
    return np.asarray([group_names.index(m) for m in MODALITIES], dtype=np.uint8)


def document_group_ids(docs: list[Document], group_names: tuple[str, ...], field: str
                       ) -> list[int]:
    """The model's group id of each document's JSONL label (Document.group)."""
    index = {name: i for i, name in enumerate(group_names)}
    ids = []
    for doc in docs:
        if doc.group not in index:
            raise ValueError(f"{doc.name}: {field} {doc.group!r} is not one of the model's "
                             f"expert groups ({', '.join(group_names)})")
        ids.append(index[doc.group])
    return ids


def encode_grouped(tokenizer: BPETokenizer, docs: list[Document], group_names: tuple[str, ...],
                   *, field: str | None = None, rule: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, group ids uint8) of `docs`, packed as BPETokenizer.encode_documents packs
    them (each document followed by end-of-text); exactly one of `field`, `rule`."""
    if (field is None) == (rule is None):
        raise ValueError("encode_grouped: give exactly one of field and rule")
    names, texts = [d.name for d in docs], [d.text for d in docs]
    if field is not None:
        whole = document_group_ids(docs, group_names, field)
        return encode_labelled(tokenizer, names, texts, modalities=whole)
    lut = rule_group_ids(rule, group_names)
    tokens, labels = encode_labelled(tokenizer, names, texts)
    return tokens, lut[labels]
