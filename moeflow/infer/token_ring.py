"""A decode step's greedy tokens written by its argmax kernel straight into host memory.

Why: between two replayed decode graphs the device ran the tokens' copy to the host (a copy op
and an event: session 42 traced 9-16 µs from one graph's last kernel to the next one's first on
an H100, against the graph launch alone when graphs replay back to back), and on the H200 the
served batch-1 step is 10-25 µs slower than its replay (benchmarks/NOTES-infer.md). Here the
argmax kernel (moeflow.ops.argmax_triton, `ring=`) stores each row's token into pinned host
memory that the device addresses directly, so nothing runs between two graphs, and the host
learns that a step's tokens are there from the tokens themselves.

How: `words_RN` holds R slots of one 64-bit word per cache slot (row), in pinned host memory;
`seq_1`, on the device, counts the steps that published. A step with seq = s writes each row's
word into slot s % R: (tag << 32) | token, tag = s % TAG_MOD + 1 (never 0: a zeroed word is no
step's), one aligned 8-byte store, so the host sees a token and its tag together; the last row
to finish adds 1 to seq. The host counts the steps it launched (`issued`) and polls its step's
slot until every row's tag is its own (`read`); a tag newer than its own means the slot was
reused before the host read it (an error, never silently another step's tokens), and an idle
stream with the tag still missing means the step will never publish (an error, not a hang).

Runs outside the host's count publish too (moeflow.infer.decode_graphs): capture's two warm-up
runs advance seq, and the host takes the device's count after them (`resync`: one stream sync,
rare); tags only grow, so no earlier write can pass for a later step's. Benchmarks' replays, any
number of them, run inside `held()`, which puts the ring back as it was, words included: a step
launched before them may not have been read yet. R = 8 slots: between a step's launch and the
host's read at most one more step (pipelined decode) and a capture's two warm-ups publish.

Legend: R ring slots, N rows (the engine's cache slots).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

SLOTS = 8
TAG_MOD = (1 << 31) - 1  # tags 1 .. 2^31 - 1: the word stays a non-negative int64
TOKEN_MASK = (1 << 32) - 1
POLLS_PER_IDLE_CHECK = 64


def tag_of(index: int) -> int:
    """The tag step `index` (its seq) writes."""
    return index % TAG_MOD + 1


class TokenRing:
    """The ring one engine's decode steps publish into (one launch at a time)."""

    def __init__(self, rows: int, device: torch.device | str) -> None:
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.words_RN = torch.zeros(SLOTS, rows, dtype=torch.int64, pin_memory=cuda)
        self.seq_1 = torch.zeros(1, dtype=torch.int64, device=device)
        self._next = 0  # the seq of the next step the host launches

    @property
    def rows(self) -> int:
        return self.words_RN.shape[1]

    def issued(self) -> int:
        """A step that publishes was launched: its seq (call once per launch, after it)."""
        index, self._next = self._next, self._next + 1
        return index

    def resync(self) -> None:
        """After runs the host did not count (warm-ups, replays outside the engine): wait for
        the device and take its count."""
        self._synchronize()
        self._next = int(self.seq_1.item())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Publishing runs the host does not count, undone: on exit the ring (its count and
        every slot's words) is as it was on entry, once the steps launched before had
        published."""
        self._synchronize()
        words_RN, seq_1 = self.words_RN.clone(), self.seq_1.clone()
        try:
            yield
        finally:
            self._synchronize()
            self.words_RN.copy_(words_RN)
            self.seq_1.copy_(seq_1)

    def read(self, index: int, n: int) -> list[int]:
        """Rows 0..n-1 of step `index` (its seq, from `issued`), once the step has written
        them."""
        if not 0 < n <= self.rows:
            raise ValueError(f"token ring: {n} rows, the ring holds {self.rows}")
        row_n = self.words_RN[index % SLOTS, :n]
        tag = tag_of(index)
        polls, idle = 0, False
        while True:
            words = row_n.tolist()
            tags = [w >> 32 for w in words]
            if all(t == tag for t in tags):
                return [w & TOKEN_MASK for w in words]
            if any(_newer(t, tag) for t in tags):
                raise RuntimeError(f"token ring: step {index}'s slot was reused before its "
                                   f"tokens were read (more than {SLOTS} steps published "
                                   f"in between)")
            if idle:  # read again after the device was seen idle: nothing more will come
                raise RuntimeError(f"token ring: step {index}'s tokens never arrived (the "
                                   f"device is idle: the step did not publish)")
            polls += 1
            idle = polls % POLLS_PER_IDLE_CHECK == 0 and self._idle()
            if not idle:
                time.sleep(0)  # lets other threads run (a server's), as a blocking wait would

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _idle(self) -> bool:
        if self.device.type != "cuda":
            return True  # the interpreter's launches (the CPU tests) return when done
        return torch.cuda.current_stream(self.device).query()


def _newer(found: int, tag: int) -> bool:
    """Whether tag `found` was written after `tag` (both 1 .. TAG_MOD; 0 is no step's): within
    half the tags' range ahead of it."""
    return found != 0 and 0 < (found - tag) % TAG_MOD < TAG_MOD // 2
