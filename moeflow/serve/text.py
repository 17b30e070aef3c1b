"""Text in and out of the server: the tokenizer, streaming detokenization and stop strings.

Both checkpoint kinds ship a `tokenizers` JSON file (moeflow's byte-level BPE saved with every
training checkpoint, or a HF tokenizer.json), so one wrapper serves both; what differs is where
the end-of-sequence token and the chat template are declared (see loader.py).

Streaming text cannot be produced by decoding one token at a time: a byte-level token can hold
half of a UTF-8 character, and some decoders change how a token renders depending on its left
neighbour. `IncrementalDecoder` therefore decodes a short window of recent tokens and emits
only the new suffix, holding it back while it ends in an incomplete character (U+FFFD); the
concatenated deltas equal decoding the whole sequence at once.

Stop strings may straddle tokens, so `TextStream` holds back the last len(longest stop) - 1
characters until it knows they do not begin a stop string; the text returned never contains a
stop string and ends where the first one began. A `drop_prefix` (the chat template's
reply_prefix, see chat.py) is removed from the start of the text if the text begins with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


@dataclass(frozen=True)
class ServeTokenizer:
    tok: Tokenizer
    eos_ids: tuple[int, ...]          # end generation (unless the request sets ignore_eos)
    bos_token: str = ""               # passed to chat templates
    eos_token: str = ""
    add_special_tokens: bool = True   # for raw completion prompts (e.g. a BOS post-processor)

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> "ServeTokenizer":
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise ValueError(f"cannot load tokenizer {str(path)!r}: {e}") from None
        return cls(tok=tok, **kw)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Token ids in, text deltas out; the deltas concatenate to decode(all ids)."""

    def __init__(self, tokenizer: ServeTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0   # window start: decoded for context, already emitted
        self._read = 0     # tokens before this are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        done = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character renders as U+FFFD)."""
        decode = self._tokenizer.decode
        done = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):] if len(text) > len(done) else ""


class TextStream:
    """Detokenizes one choice's tokens and cuts the text at the first stop string."""

    def __init__(self, tokenizer: ServeTokenizer, stop: tuple[str, ...] = (),
                 drop_prefix: str = "") -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self._prefix = drop_prefix   # still to be matched against the start of the text
        self.stopped = False

    def _drop_prefix(self, final: bool) -> bool:
        """Remove the prefix once the text shows it; False while the text could still be it."""
        if not self._prefix:
            return True
        if self._pending.startswith(self._prefix):
            self._pending = self._pending[len(self._prefix):]
        elif not final and self._prefix.startswith(self._pending):
            return False
        self._prefix = ""
        return True

    def _emit(self, final: bool) -> str:
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        keep = 0 if final else min(self._hold, len(self._pending))
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return out

    def push(self, token_id: int) -> str:
        """Text that is now safe to send; check `.stopped` after each call."""
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token_id)
        if not self._drop_prefix(final=False):
            return ""
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text once the sequence has ended."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        self._drop_prefix(final=True)
        return self._emit(final=True)
