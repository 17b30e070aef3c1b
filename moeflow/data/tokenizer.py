"""moeflow's one tokenizer class: a `tokenizers.Tokenizer` plus what its checkpoint declares.

moeflow's own tokenizer is a byte-level BPE trained on the run's training split and saved with
every checkpoint. Byte-level (GPT-2 style) so any text round-trips, and so code keeps its
whitespace. `<|endoftext|>` (id 0) is placed between documents when packing, starts a new
document when generating from an empty prompt, and ends generation. Training sees the training
split only, so validation loss is measured on text the tokenizer never saw. The Rust trainer is
deterministic for a fixed input, which the resume test relies on when a fresh run and an
interrupted one both train their tokenizer from scratch.

The same class wraps a HF checkpoint's tokenizer.json for serving (`from_file`); what such a
checkpoint declares elsewhere — its end-of-sequence ids, the bos/eos strings its chat template
uses, whether raw prompts get special tokens (a BOS post-processor) — is read by
moeflow.serve.loader and stored in the fields below. Streaming detokenization over this class
lives in moeflow.infer.text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MIN_VOCAB = 258  # 256 byte symbols + end-of-text + at least one merge
ENCODE_BATCH_CHARS = 4 << 20  # text per encode_batch call (see encode_documents)


def _read(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise ValueError(f"cannot load tokenizer {str(path)!r}: {e}") from None


@dataclass(frozen=True, eq=False)
class BPETokenizer:
    tok: Tokenizer
    eos_ids: tuple[int, ...] = ()     # end generation (unless a request sets ignore_eos)
    bos_token: str = ""               # passed to chat templates
    eos_token: str = ""
    add_special_tokens: bool = False  # for raw prompts (True for a BOS post-processor)

    @classmethod
    def own(cls, tok: Tokenizer) -> "BPETokenizer":
        """moeflow's tokenizer: `<|endoftext|>` must exist, and it ends generation."""
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        return cls(tok, eos_ids=(eot,), eos_token=EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size}: must be >= {MIN_VOCAB}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls.own(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """moeflow's tokenizer as saved with a checkpoint or a prepared dataset."""
        return cls.own(_read(path))

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """Any `tokenizers` JSON file, nothing declared yet (dataclasses.replace adds it)."""
        return cls(_read(path))

    @property
    def eot_id(self) -> int:
        """`<|endoftext|>`: the document separator and new-document prompt of moeflow's own."""
        eot = self.tok.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        return eot

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self.tok.encode(text, add_special_tokens=special).ids

    def encodings(self, texts: Iterable[str], offsets: bool = False) -> Iterator[Encoding]:
        """Each text's Encoding, in order, encoded ENCODE_BATCH_CHARS of text at a time (each
        batch on every core); `offsets`: with each token's character span (slower).

        Callers keep what they need of each and let it go: an Encoding costs ~90 bytes per
        token. Measured on this project's CPU machine, `builtin:interpreter` (272 MB, 106 M
        tokens): peak RSS 10.7 GB encoded in one batch, 1.8 GB batched (and 160 → 103 s);
        each rank of a multi-process run encodes its own copy, so two gloo ranks on a 24 GB
        machine were killed before."""
        encode = self.tok.encode_batch if offsets else self.tok.encode_batch_fast
        batch, chars = [], 0
        for text in texts:
            batch.append(text)
            chars += len(text)
            if chars >= ENCODE_BATCH_CHARS:
                yield from encode(batch, add_special_tokens=self.add_special_tokens)
                batch, chars = [], 0
        yield from encode(batch, add_special_tokens=self.add_special_tokens)

    def encode_documents(self, texts: Iterable[str]) -> np.ndarray:
        """All texts as one int32 stream, each followed by end-of-text."""
        eot = np.asarray([self.eot_id], dtype=np.int32)
        pieces = []
        for enc in self.encodings(texts):
            pieces += [np.asarray(enc.ids, dtype=np.int32), eot]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())
