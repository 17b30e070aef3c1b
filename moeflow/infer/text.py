"""Text out of the engine: streaming detokenization, stop strings, and `generate_text`.

The engine works on token ids only; this file turns its token events into text, for
`moeflow generate` and the demo (`generate_text`) and for the server (moeflow.serve.app, one
`TextStream` per choice), so both cut text at stop strings the same way.

Streaming text cannot be produced by decoding one token at a time: a byte-level token can hold
half of a UTF-8 character, and some decoders change how a token renders depending on its left
neighbour. `IncrementalDecoder` therefore decodes a short window of recent tokens and emits
only the new suffix, holding it back while it ends in an incomplete character (U+FFFD); the
concatenated deltas equal decoding the whole sequence at once.

Stop strings work on the text, not on token ids: BPE may spell a string with different tokens
depending on what precedes it, so token-id stop sequences would miss it. They may also straddle
tokens, so `TextStream` holds back the last len(longest stop) - 1 characters until it knows
they do not begin a stop string; the text returned never contains a stop string and ends where
the first one began. A `drop_prefix` (the chat template's reply_prefix, see
moeflow.serve.chat) is removed from the start of the text if the text begins with it.
"""

from __future__ import annotations

from dataclasses import replace

from moeflow.data.tokenizer import BPETokenizer
from moeflow.infer.engine import Engine
from moeflow.infer.sampling import SamplingParams

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Token ids in, text deltas out; the deltas concatenate to decode(all ids)."""

    def __init__(self, tokenizer: BPETokenizer) -> None:
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
    """Detokenizes one sequence's tokens and cuts the text at the first stop string."""

    def __init__(self, tokenizer: BPETokenizer, stop: tuple[str, ...] = (),
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


def generate_text(engine: Engine, tokenizer: BPETokenizer, prompt: str, params: SamplingParams,
                  stop: tuple[str, ...] = (), group: str | None = None) -> str:
    """The continuation of `prompt` as text, run through `engine` (which must be idle).

    The text ends before the first stop token (params.stop_token_ids, not rendered) or stop
    string, whichever comes first; generation ends at that step. An empty prompt starts a new
    document (the end-of-text token). A prompt that leaves no room in the engine's context is
    refused rather than silently truncated; otherwise max_new_tokens is capped by the room left.
    `group`: the expert group of prompt and generation (models with expert groups).
    """
    if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop={stop!r}: give a tuple of stop strings")
    if any(not s for s in stop):
        raise ValueError(f"stop={stop!r}: stop strings must not be empty")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    room = engine.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"prompt has {len(ids)} tokens; the context is {engine.max_seq_len}")
    if engine.has_work():
        raise RuntimeError("generate_text() needs an idle engine")
    params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
    names = [name for name, _ in engine.expert_groups]
    if group is None and names:
        raise ValueError(f"the model has expert groups ({', '.join(names)}): name the "
                         f"prompt's group (moeflow generate --expert-group NAME)")
    if group is not None and group not in names:
        raise ValueError(f"expert group {group!r}: the model's groups are "
                         f"{', '.join(names) or 'none'}")
    request_id = engine.add_request(ids, params,
                                    groups=None if group is None else names.index(group))
    stream, text = TextStream(tokenizer, stop), ""
    while engine.has_work():
        for event in engine.step():
            if event.token_id is None or stream.stopped:
                continue  # the abort event of a stop string
            if event.token_id not in params.stop_token_ids:
                text += stream.push(event.token_id)
            if stream.stopped:
                engine.abort(request_id)
            elif event.finished:
                text += stream.finish()
    return text


def generate_text_on_ranks(path: str, par, device: str, prompt: str, sampling: dict,
                           stop: tuple[str, ...] = (), dtype: str | None = None) -> str | None:
    """`generate_text` on the ranks torchrun started, the model split by `par`
    (moeflow.parallel.inference.InferenceParallel); `sampling`: SamplingParams fields; `dtype`:
    cast the weights (None: as stored). Returns the text on rank 0, None on the others (they
    run the same forwards)."""
    from moeflow.infer.engine import EngineConfig
    from moeflow.parallel.launch import finish
    from moeflow.serve.loader import load_shard_for_serving

    shard = load_shard_for_serving(path, par, device, dtype)
    engine = Engine(shard.model, EngineConfig(max_batch_size=1), shard.channel)
    if shard.loaded is None:
        engine.follow()
        finish(shard.env)
        return None
    tokenizer = shard.loaded.tokenizer
    params = SamplingParams(**sampling, stop_token_ids=tokenizer.eos_ids)
    try:
        text = generate_text(engine, tokenizer, prompt, params, stop=stop)
    finally:
        engine.close()
    finish(shard.env)
    return text
