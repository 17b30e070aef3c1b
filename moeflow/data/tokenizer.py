"""A byte-level BPE tokenizer trained on the run's training split, saved with every checkpoint.

Byte-level (GPT-2 style) so any text round-trips, and so code keeps its whitespace. Id 0 is
`<|endoftext|>`, placed between documents when packing and used to stop generation. Training
sees the training split only, so validation loss is measured on text the tokenizer never saw.
The Rust trainer is deterministic for a fixed input, which the resume test relies on when a
fresh run and an interrupted one both train their tokenizer from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
MIN_VOCAB = 258  # 256 byte symbols + end-of-text + at least one merge


class BPETokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_id = eot

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
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """All texts as one int32 stream, each followed by end-of-text."""
        pieces = []
        for enc in self._tok.encode_batch_fast(texts):
            pieces.append(np.asarray(enc.ids, dtype=np.int32))
            pieces.append(np.asarray([self.eot_id], dtype=np.int32))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise ValueError(f"cannot load tokenizer {str(path)!r}: {e}") from None
